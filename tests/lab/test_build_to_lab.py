"""``build --to``: Debian's 6.1.192-3 security revision as one update for 6.1.0-56 (which runs
6.1.192-2), built from the two versions' own source packages, applied in the lab with nfsd
loaded, ``status`` showing the effective Debian version, reverted with no oops."""

from __future__ import annotations

import json
import re

import pytest

from dynamos.builder.debian import CARRIED, Change, build_changes, build_to
from dynamos.target.source import prepare_source
from tests.lab.test_patches import applied

pytestmark = pytest.mark.lab
TO = "6.1.192-3"


def test_build_to_the_next_debian_revision_applied_and_reverted(guest, target, workdir):
    assert target.release == "6.1.0-56-amd64", "this test is written for 6.1.0-56, which runs 6.1.192-2"
    out = workdir / "build-to"
    out.mkdir(exist_ok=True)
    result = build_to(target, TO, output=out)  # fails naming the archive's versions if -3 is gone
    assert (result.from_version, result.to_version) == ("6.1.192-2", TO)
    assert [(f.path, f.status) for f in result.files] == [("fs/nfsd/nfs4state.c", CARRIED)], result.files
    assert not result.partial and result.cves == ["CVE-2026-99362"]
    assert [e.version for e in result.changelog] == [TO]

    before = guest.modules()
    guest.sh("dmesg -c > /dev/null")
    guest.run("modprobe", "nfsd")
    try:
        with applied(guest, result.package_path) as r:
            assert [(f["name"], f["object"]) for f in r["functions"]] == [("nfsd4_sequence", "nfsd")]
            name = r["name"].replace("-", "_")  # the livepatch (module) name
            assert guest.read(f"/sys/kernel/livepatch/{name}/transition").strip() == "0"
            assert guest.read(f"/sys/kernel/livepatch/{name}/nfsd/patched").strip() == "1"
            status = json.loads(guest.dynamos("status", "--json").stdout)
            assert status["effective_version"] == "6.1.192-2, live-updated to 6.1.192-3", status
            assert status["cves"] == ["CVE-2026-99362"]
            [update] = [u for u in status["updates"] if u["name"] == name]
            assert update["replace"] is True and update["debian"]["partial"] is False
            text = guest.dynamos("status").stdout.decode()
            assert "effective version 6.1.192-2, live-updated to 6.1.192-3" in text, text
        assert name not in guest.livepatches()
        assert "effective_version" not in json.loads(guest.dynamos("status", "--json").stdout)
        bad = [line for line in guest.sh("dmesg").splitlines() if re.search(r"Oops|WARNING:|BUG:", line)]
        assert not bad, bad
    finally:
        guest.run("modprobe", "-r", "nfsd", check=False)
        left = guest.modules() - before  # kmod leaves sunrpc and grace behind (see test_lab.py)
        if left:
            guest.run("modprobe", "-r", *sorted(left), check=False)


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
