"""Static locals on real units of the target's source: the builder's compiles number them
otherwise than the kernel's build did, and the update still reaches the kernel's copies."""

from __future__ import annotations

import difflib
from pathlib import Path

from dynamos.builder.patch import build_from_patch
from dynamos.target.source import prepare_source


def build(target, tmp_path: Path, rel: str, old: str, new: str, name: str, before: str = "", helper: str = ""):
    """Build ``rel`` with ``old`` replaced by ``new`` (and ``helper`` inserted ahead of ``before``)."""
    tree = prepare_source(target).tree
    text = (tree / rel).read_text()
    assert old in text and before in text
    after = text.replace(old, new, 1)
    if helper:
        after = after.replace(before, helper + before, 1)
    patch = tmp_path / f"{name}.patch"
    patch.write_text("".join(difflib.unified_diff(text.splitlines(True), after.splitlines(True),
                                                  f"a/{rel}", f"b/{rel}")))
    return build_from_patch(patch, target, name=name)


def test_func_of_a_module_unit_travels_with_the_update(target, tmp_path: Path) -> None:
    # nfsd has two __func__.9: this used to be refused ("could not tell which one this file's is").
    b = build(target, tmp_path, "fs/nfsd/nfs4state.c", 'dprintk("%s: slotid %d\\n", __func__, seq->slotid);',
              'dprintk("%s: slot id %d\\n", __func__, seq->slotid);', "nfsd-func")
    assert [c.name for u in b.units for c in u.diff.changed] == ["nfsd4_sequence"]
    assert not [s for s in b.klp_symbols if s.name.startswith("__func__")], b.klp_symbols


def test_static_local_of_an_inlined_function_is_the_kernels_copy(target, tmp_path: Path) -> None:
    # audit_rate_check is inlined into audit_log_start; a new helper with a static of its own
    # makes gcc number its statics messages.4 and last_check.3, where the running kernel has
    # messages.3 and last_check.2. The previous builder refused: "messages.4 is used by the
    # changed code but the kernel has no such symbol".
    b = build(target, tmp_path, "kernel/audit.c", "if (++messages < audit_rate_limit) {",
              "if (++messages + 0 * dynamos_rate_calls() < audit_rate_limit) {", "audit-messages",
              before="static inline int audit_rate_check(void)\n{\n",
              helper="static noinline unsigned int dynamos_rate_calls(void)\n{\n\tstatic unsigned int calls;\n\n"
                     "\treturn ++calls;\n}\n\n")
    statics = b.units[0].statics
    renamed = {name: sym.name for name, sym in statics.found.items() if sym.name != name}
    assert {n.split(".")[0] for n in renamed} >= {"messages", "last_check"}, renamed
    kernel = {s.name: s for s in b.klp_symbols}
    for name in ("messages", "last_check"):
        patched = next(n for n in renamed if n.startswith(name + "."))
        assert renamed[patched] in kernel and kernel[renamed[patched]].object == "vmlinux", b.klp_symbols
        assert patched not in kernel
        assert "the address the matched code uses" in statics.how[patched]
