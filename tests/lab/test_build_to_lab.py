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


def test_a_fix_that_needs_a_far_reaching_headers_change_borrows_only_that_and_runs(guest, target, workdir):
    """A release's .c fix calls seq_setwidth with the parameter the same release adds to it in
    seq_file.h, a header refused for its reach (--max-units 3), where the compiler's note says
    seq_setwidth is declared; fs.h's unrelated layout change, which the unit also reads, is not
    borrowed. The fix is carried and runs."""
    tree = prepare_source(target).tree
    old_inline = ("static inline void seq_setwidth(struct seq_file *m, size_t size)\n{\n"
                  "\tm->pad_until = m->count + size;")
    edits = {
        "include/linux/seq_file.h": (old_inline, "static inline void seq_setwidth(struct seq_file *m, size_t size, "
                                                 "size_t extra)\n{\n\tm->pad_until = m->count + size + extra;"),
        "fs/proc/cmdline.c": ("\tseq_puts(m, saved_command_line);\n",
                              '\tseq_setwidth(m, 0, 0);\n\tseq_puts(m, "borrowed ");\n'
                              '\tseq_puts(m, saved_command_line);\n'),
        "include/linux/fs.h": ("struct file {\n\tunion {\n", "struct file {\n\tint dynamos_unrelated;\n\tunion {\n"),
    }
    texts = {}
    for rel, (old, new) in edits.items():
        text = (tree / rel).read_text()
        assert old in text, rel
        texts[rel] = text.replace(old, new, 1).encode()
    out = workdir / "build-to-borrow"
    out.mkdir(exist_ok=True)
    build = build_changes(target, "6.1.192-2", "6.1.192-9", [Change(p, "modified") for p in sorted(texts)],
                          texts.__getitem__, [], output=out, max_units=3)
    got = {f.path: (f.status, f.code) for f in build.files}
    assert got == {"fs/proc/cmdline.c": ("carried", ""), "include/linux/fs.h": ("refused", "header-reach"),
                   "include/linux/seq_file.h": ("refused", "header-reach")}, build.files
    original = guest.read("/proc/cmdline")
    with applied(guest, build.package_path):
        assert guest.read("/proc/cmdline") == "borrowed " + original
    assert guest.read("/proc/cmdline") == original
