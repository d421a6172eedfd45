"""Static locals on real units of the target's source: the builder's compiles number them
otherwise than the kernel's build did, and the update still reaches the kernel's copies."""

from __future__ import annotations

import difflib
from pathlib import Path

from dynamos.builder.patch import build_from_patch
from dynamos.target.source import prepare_source


def build(target, tmp_path: Path, rel: str, old: str, new: str, name: str):
    tree = prepare_source(target).tree
    before = (tree / rel).read_text()
    assert old in before
    patch = tmp_path / f"{name}.patch"
    patch.write_text("".join(difflib.unified_diff(before.splitlines(True), before.replace(old, new, 1)
                                                  .splitlines(True), f"a/{rel}", f"b/{rel}")))
    return build_from_patch(patch, target, name=name)


def test_func_of_a_module_unit_travels_with_the_update(target, tmp_path: Path) -> None:
    # nfsd has two __func__.9: this used to be refused ("could not tell which one this file's is").
    b = build(target, tmp_path, "fs/nfsd/nfs4state.c", 'dprintk("%s: slotid %d\\n", __func__, seq->slotid);',
              'dprintk("%s: slot id %d\\n", __func__, seq->slotid);', "nfsd-func")
    assert [c.name for u in b.units for c in u.diff.changed] == ["nfsd4_sequence"]
    assert not [s for s in b.klp_symbols if s.name.startswith("__func__")], b.klp_symbols


def test_static_local_of_an_inlined_function_is_the_kernels_copy(target, tmp_path: Path) -> None:
    # audit_rate_check is inlined into audit_log_start; its static `messages` is the running
    # kernel's messages.N whatever number the builder's compile gives it.
    b = build(target, tmp_path, "kernel/audit.c", "if (++messages < audit_rate_limit) {",
              "if (++messages <= audit_rate_limit) {", "audit-messages")
    unit = b.units[0]
    found = {name: sym for name, sym in unit.statics.found.items() if name.startswith("messages.")}
    assert len(found) == 1, unit.statics.found
    sym = next(iter(found.values()))
    kernel = [s for s in b.klp_symbols if s.name.startswith("messages.")]
    assert kernel == [sym] and sym.object == "vmlinux", b.klp_symbols
    assert "the address the matched code uses" in unit.statics.how[next(iter(found))]
