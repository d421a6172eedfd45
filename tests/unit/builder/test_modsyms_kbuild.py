"""A fix to drivers/md/raid10.c, a module calling functions md-mod exports (kbuild: compiles the
real unit). The update must load whether or not md-mod is loaded: md_write_start/md_write_end
become livepatch symbols of md_mod in raid10's relocation sections, never left to the loader."""

from __future__ import annotations

import difflib
from pathlib import Path

from dynamos.builder.elf import SHN_UNDEF, RelocatableElf
from dynamos.builder.kbuild import read_modinfo
from dynamos.builder.klp import SHN_LIVEPATCH, KlpSymbol
from dynamos.builder.patch import build_from_patch
from dynamos.target import cache_root
from dynamos.target.source import prepare_source

RAID10 = "drivers/md/raid10.c"
# raid10_make_request calls md_write_start and md_write_end (md_mod's exports); the fix logs each write.
OLD = "\tif (!md_write_start(mddev, bio))\n\t\treturn false;\n"
NEW = OLD + '\tpr_info("md/raid10:%s: dynamos write of %d sectors\\n", mdname(mddev), sectors);\n'


def raid10_patch(target, path: Path) -> Path:
    text = (prepare_source(target).tree / RAID10).read_text()
    assert OLD in text
    path.write_text("".join(difflib.unified_diff(text.splitlines(True), text.replace(OLD, NEW, 1).splitlines(True),
                                                 f"a/{RAID10}", f"b/{RAID10}")))
    return path


def test_md_mod_exports_used_by_a_raid10_fix_are_relocated_when_raid10_loads(target, tmp_path: Path) -> None:
    b = build_from_patch(raid10_patch(target, tmp_path / "raid10.patch"), target, name="raid10-writes")
    changed = {(c.name, u.object) for u in b.units for c in u.diff.changed}
    assert ("raid10_make_request", "raid10") in changed and {o for _, o in changed} == {"raid10"}, changed
    md = {s.name: s for s in b.klp_symbols if s.object == "md_mod"}
    assert md.keys() >= {"md_write_start", "md_write_end"}, b.klp_symbols
    assert md["md_write_end"] == KlpSymbol("md_write_end", "md_mod", 0, patched="raid10")

    linked = (cache_root() / "builds" / f"patch-raid10-writes-{target.release}" / "raid10_writes.ko").read_bytes()
    obj = RelocatableElf.parse(linked, "raid10_writes.ko")
    # Nothing of md_mod is left for the module loader (which would need md_mod loaded).
    undefined = {s.name for s in obj.symbols if s.shndx == SHN_UNDEF and s.name}
    assert not undefined & {"md_write_start", "md_write_end"}, undefined
    assert "md_mod" not in read_modinfo(linked).get("depends", "").split(","), read_modinfo(linked)
    # Their relocations are raid10's, naming md_mod's symbols.
    by_section: dict[str, set[str]] = {}
    for index, sec in enumerate(obj.sections):
        if sec.name.startswith(".klp.rela."):
            by_section.setdefault(sec.name.split(".")[3], set()).update(
                obj.symbols[r.sym].name for r in obj.relocations(index))
    assert {".klp.sym.md_mod.md_write_start,0", ".klp.sym.md_mod.md_write_end,0"} <= by_section["raid10"], by_section
    assert "md_mod" not in by_section
    assert all(obj.symbols[i].shndx == SHN_LIVEPATCH for i, s in enumerate(obj.symbols)
               if s.name.startswith(".klp.sym.md_mod."))


def test_an_update_named_like_the_module_it_patches_is_refused(target, tmp_path: Path) -> None:
    # Found in the lab: an update module named raid10 made livepatch resolve md_mod's symbols at once.
    import pytest

    from dynamos.errors import BuildError
    with pytest.raises(BuildError, match=r"named like the module it patches \(raid10\)"):
        build_from_patch(raid10_patch(target, tmp_path / "raid10.patch"), target)


HDM = "drivers/cxl/core/hdm.c"
# commit_reap (built into vmlinux: CONFIG_CXL_BUS=y) calls to_cxl_port, exported in namespace CXL.
HDM_OLD = ("\tif (!is_switch_decoder(dev) && !is_endpoint_decoder(dev))\n\t\treturn 0;\n\n"
           "\tcxld = to_cxl_decoder(dev);\n")
HDM_NEW = HDM_OLD + "\tif (!port)\n\t\treturn 0;\n"


def test_an_export_in_a_symbol_namespace_is_imported_by_the_update(target, tmp_path: Path) -> None:
    """Found by the stable point release bench: an update calling to_cxl_port (EXPORT_SYMBOL_NS_GPL
    in namespace CXL) did not link (modpost: 'uses symbol ... from namespace CXL, but does not
    import it'). The update imports the namespaces of the exports its code leaves to the loader."""
    text = (prepare_source(target).tree / HDM).read_text()
    assert HDM_OLD in text
    patch = tmp_path / "hdm.patch"
    after = text.replace(HDM_OLD, HDM_NEW, 1)
    diff = difflib.unified_diff(text.splitlines(True), after.splitlines(True), f"a/{HDM}", f"b/{HDM}")
    patch.write_text("".join(diff))
    b = build_from_patch(patch, target, name="cxl-reap")
    assert ("commit_reap", "vmlinux") in {(c.name, u.object) for u in b.units for c in u.diff.changed}
    linked = (cache_root() / "builds" / f"patch-cxl-reap-{target.release}" / "cxl_reap.ko").read_bytes()
    obj = RelocatableElf.parse(linked, "cxl_reap.ko")
    assert "to_cxl_port" in {s.name for s in obj.symbols if s.shndx == SHN_UNDEF}  # left to the loader
    assert read_modinfo(linked).get("import_ns") == "CXL", read_modinfo(linked)


RXRPC = "net/rxrpc/call_accept.c"
RXRPC_OLD = "\t\tconn = rxrpc_prealloc_service_connection(rxnet, gfp);\n\t\tif (!conn)\n\t\t\treturn -ENOMEM;\n"
RXRPC_NEW = RXRPC_OLD.replace("-ENOMEM", "-ENOBUFS")


def test_the_issues_rxrpc_fix_with_module_tracepoints_builds(target, tmp_path: Path) -> None:
    """Issue 10's example, once refused: rxrpc_service_prealloc_one traces through rxrpc's own
    tracepoints (keys defined in the module). Their sites become jumps to the tracepoint's code."""
    text = (prepare_source(target).tree / RXRPC).read_text()
    assert RXRPC_OLD in text
    patch = tmp_path / "rxrpc.patch"
    diff = difflib.unified_diff(text.splitlines(True), text.replace(RXRPC_OLD, RXRPC_NEW, 1).splitlines(True),
                                f"a/{RXRPC}", f"b/{RXRPC}")
    patch.write_text("".join(diff))
    b = build_from_patch(patch, target, name="rxrpc-prealloc")
    (unit,) = b.units
    assert (unit.object, [c.name for c in unit.diff.changed]) == ("rxrpc", ["rxrpc_service_prealloc_one"])
    traced = {(k.key, k.object) for k in unit.key_sites if "tracepoint's code" in k.how}
    assert {("__tracepoint_rxrpc_conn", "rxrpc"), ("__tracepoint_rxrpc_call", "rxrpc")} <= traced, unit.key_sites
