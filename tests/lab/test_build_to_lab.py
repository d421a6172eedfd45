"""``build --to`` on a kernel already live-updated: a later (partial) update replaces the first and
``status`` names what it left. Debian's 6.1.192-3 revision itself, built by ``build --to``, applied
with nfsd serving a mount and ``status`` showing the effective version, is in
test_debian_revisions_lab.py."""

from __future__ import annotations

import json

import pytest

from dynamos.builder.debian import Change, build_changes, build_to
from dynamos.target.source import prepare_source
from tests.lab.test_patches import applied

pytestmark = pytest.mark.lab
TO = "6.1.192-3"


def test_a_later_partial_update_replaces_the_first_and_status_names_what_it_left(guest, target, workdir):
    """A second build --to on a live-updated kernel: diffed from the image's version again, its
    update replaces the first (replace = true). Made here from a synthetic later revision (the
    archive has none after 6.1.192-3): one carried change whose code is seen running, one refused."""
    out = workdir / "build-to"
    out.mkdir(exist_ok=True)
    first = build_to(target, TO, output=out)
    tree = prepare_source(target).tree
    cmdline = (tree / "fs/proc/cmdline.c").read_text()
    pipe = (tree / "fs/pipe.c").read_text()
    texts = {"fs/proc/cmdline.c": cmdline.replace("\tseq_puts(m, saved_command_line);",
                                                  '\tseq_printf(m, "%s dynamos-to-9", saved_command_line);').encode(),
             "fs/pipe.c": pipe.replace("pipe_max_size = 1048576;", "pipe_max_size = 2097152;").encode()}
    later = build_changes(target, first.from_version, "6.1.192-9", [Change(p, "modified") for p in sorted(texts)],
                          texts.__getitem__, [], output=out)
    assert later.from_version == "6.1.192-2" and later.not_carried == ["fs/pipe.c"] and later.cves == []
    r1 = json.loads(guest.dynamos("apply", str(first.package_path), "--json").stdout)
    first_name = r1["name"].replace("-", "_")
    try:
        with applied(guest, later.package_path) as r2:
            later_name = r2["name"].replace("-", "_")
            assert guest.read("/proc/cmdline").rstrip().endswith("dynamos-to-9")
            status = json.loads(guest.dynamos("status", "--json").stdout)
            assert status["effective_version"] == \
                "6.1.192-2, live-updated to 6.1.192-9; 1 file not carried: fs/pipe.c", status
            assert first_name not in guest.livepatches()  # replaced: dynamos unloaded it
            assert later_name in guest.livepatches()
        assert "dynamos-to-9" not in guest.read("/proc/cmdline")
        assert later_name not in guest.livepatches()
    finally:
        if first_name in guest.livepatches():  # the later one failed to replace it
            guest.dynamos("revert", r1["name"])
