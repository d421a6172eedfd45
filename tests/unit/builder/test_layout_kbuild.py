"""``build --patch`` with a patched local header, on real units of the target's source: the types
of each unit's original and patched objects decide whether the header changes a layout."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from dynamos.builder.patch import build_from_patch
from dynamos.errors import BuildError
from dynamos.target.source import prepare_source


def header_patch(target, tmp_path: Path, rel: str, old: str, new: str) -> Path:
    text = (prepare_source(target).tree / rel).read_text()
    assert old in text, f"{rel}: {old!r} not found"
    patch = tmp_path / "header.patch"
    patch.write_text("".join(difflib.unified_diff(text.splitlines(True), text.replace(old, new, 1).splitlines(True),
                                                  f"a/{rel}", f"b/{rel}")))
    return patch


def test_a_member_added_to_a_struct_a_unit_uses_is_refused_naming_it(target, tmp_path: Path) -> None:
    patch = header_patch(target, tmp_path, "drivers/md/raid10.h", "\tstruct mddev\t\t*mddev;\n",
                         "\tstruct mddev\t\t*mddev;\n\tint\t\t\tdynamos_new;\n")
    with pytest.raises(BuildError) as e:
        build_from_patch(patch, target, name="raid10-layout")
    assert e.value.code == "changed-layout"
    assert "drivers/md/raid10.h: struct r10conf changes layout: " in str(e.value), e.value
    assert "member dynamos_new added at offset 8" in str(e.value), e.value
    assert "member mirrors moved from offset 8 to 16" in str(e.value), e.value


def test_a_static_inline_body_changes_no_layout_and_is_carried(target, tmp_path: Path) -> None:
    patch = header_patch(target, tmp_path, "fs/proc/fd.h", "\treturn PROC_I(inode)->fd;\n",
                         "\treturn PROC_I(inode)->fd & 0x7fffffff;\n")
    b = build_from_patch(patch, target, name="proc-fd-inline")
    assert sorted(u.path for u in b.units) == ["fs/proc/base.c", "fs/proc/fd.c"]
    assert all("layout" in u.seconds for u in b.units)  # the types were compared for both units
    checked = [line for line in b.explain() if line.startswith("  checked   types of fs/proc/fd.h: ")]
    assert len(checked) == 2 and all(line.endswith(": no layout change") for line in checked), b.explain()
    assert sorted(c.name for u in b.units for c in u.diff.changed) == ["proc_fd_link", "seq_show",
                                                                       "tid_fd_revalidate"]
