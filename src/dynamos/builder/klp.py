"""Livepatch relocations: let an update's C use kernel symbols that are not exported.

The module loader links a module only against exported symbols. Everything else an edition
touches (``nr_threads``, a file-static helper, ``saved_command_line``) is reached through
livepatch relocations instead (Documentation/livepatch/module-elf-format.rst): the symbol is
renamed ``.klp.sym.<object>.<name>,<sympos>`` and marked SHN_LIVEPATCH, and the relocations that
use it move to ``.klp.rela.<object>.<section>`` sections flagged SHF_RELA_LIVEPATCH, which the
loader skips and livepatch applies once it has looked the symbol up in kallsyms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dynamos.abi import VMLINUX, klp_placeholder
from dynamos.builder.elf import (
    RELA,
    SHF_ALLOC,
    SHF_INFO_LINK,
    SHN_UNDEF,
    SHT_RELA,
    STB_LOCAL,
    RelocatableElf,
    Section,
)
from dynamos.errors import BuildError

# The livepatch module format's own ELF values (module-elf-format.rst).
SHN_LIVEPATCH = 0xFF20
SHF_RELA_LIVEPATCH = 0x00100000


@dataclass(frozen=True)
class KlpSymbol:
    """A symbol resolved by livepatch at load time: where it lives and which of its namesakes."""

    name: str
    object: str = VMLINUX
    sympos: int = 0  # 0: the name is unique in its object; else 1-based position in kallsyms
    # The patched object whose ``.klp.rela.<object>.*`` sections carry the relocations (empty: the
    # symbol's own object). Livepatch writes them when that object loads, so a symbol of another
    # module (``md_write_end`` of md_mod, used by raid10's new code) is tied to the module whose code
    # uses it, and that module's dependency on md_mod makes sure md_mod is there by then.
    patched: str = ""

    @property
    def rela_object(self) -> str:
        return self.patched or self.object

    @property
    def klp_name(self) -> str:
        return f".klp.sym.{self.object}.{self.name},{self.sympos}"

    @property
    def placeholder(self) -> str:
        """A name generated code links against, standing for this symbol until convert_to_klp."""
        return klp_placeholder(self.object, self.name, self.sympos, self.patched)

    def to_json(self) -> dict:
        return {"name": self.name, "object": self.object, "sympos": self.sympos}


def exported_symbols(module_symvers: Path) -> set[str]:
    """Names exported by the target kernel and its modules (``Module.symvers``)."""
    return set(exporters(module_symvers))


def exporters(module_symvers: Path) -> dict[str, str]:
    """Exported name -> the object exporting it (``vmlinux``, or a module name: ``md_mod`` for
    ``drivers/md/md-mod``), from ``Module.symvers`` (crc, name, module path, kind, namespace)."""
    out: dict[str, str] = {}
    with module_symvers.open() as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                where = parts[2] if len(parts) >= 3 and parts[2] else VMLINUX
                out[parts[1]] = VMLINUX if where == VMLINUX else where.rsplit("/", 1)[-1].replace("-", "_")
    return out


def export_namespaces(module_symvers: Path) -> dict[str, str]:
    """Exported name -> its symbol namespace (``EXPORT_SYMBOL_NS``, the fifth column of
    ``Module.symvers``), for the names that have one: a module that uses such a name must import
    the namespace (``MODULE_IMPORT_NS``), or modpost refuses to link it."""
    out: dict[str, str] = {}
    with module_symvers.open() as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 5 and parts[4]:
                out[parts[1]] = parts[4]
    return out


def namespaces_used(objects: list[RelocatableElf], namespaces: Mapping[str, str]) -> list[str]:
    """The namespaces of the exported names the objects leave to the module loader."""
    return sorted({namespaces[name] for obj in objects for name in unresolved_symbols(obj) if name in namespaces})


def import_namespaces(objects: Iterable[Path], module_symvers: Path) -> list[str]:
    """What an update linking ``objects`` must import (``MODULE_IMPORT_NS``): the namespaces of
    the exports (EXPORT_SYMBOL_NS: CXL, ...) its code calls through the loader."""
    return namespaces_used([RelocatableElf.parse(o.read_bytes(), o.name) for o in objects],
                           export_namespaces(module_symvers))


def unresolved_symbols(obj: RelocatableElf) -> list[str]:
    """Undefined global symbols of a module, in symbol-table order."""
    return [s.name for s in obj.symbols if s.shndx == SHN_UNDEF and s.name and s.binding != STB_LOCAL]


def klp_symbols_needed(module: bytes, exported: set[str],
                       declared: Mapping[str, KlpSymbol] | None = None) -> list[KlpSymbol]:
    """The module's undefined symbols the loader cannot resolve, as livepatch symbols.

    ``declared`` (from update.toml ``[[symbol]]``) says which object or namesake is meant;
    the default is a unique symbol of vmlinux.
    """
    declared = declared or {}
    obj = RelocatableElf.parse(module, "livepatch module")
    return [declared.get(name, KlpSymbol(name)) for name in unresolved_symbols(obj) if name not in exported]


def convert_to_klp(module: bytes, symbols: Iterable[KlpSymbol] | Mapping[str, KlpSymbol]) -> bytes:
    """Rewrite a built module so ``symbols`` are resolved by livepatch instead of the loader.

    ``symbols`` lists kernel symbols the module references by their own names, or maps the
    module's (placeholder) symbol names to the kernel symbols they stand for.
    """
    by_name = dict(symbols) if isinstance(symbols, Mapping) else {s.name: s for s in symbols}
    if not by_name:
        return module
    _check_module_objects(by_name.values())
    obj = RelocatableElf.parse(module, "livepatch module")
    klp_index: dict[int, KlpSymbol] = {}
    found: set[str] = set()
    for i, sym in enumerate(obj.symbols):
        if sym.shndx == SHN_UNDEF and sym.name in by_name:
            found.add(sym.name)
            klp_index[i] = by_name[sym.name]
            sym.name = by_name[sym.name].klp_name
            sym.shndx = SHN_LIVEPATCH
    missing = set(by_name) - found
    if missing:
        raise BuildError(f"livepatch symbols not referenced by the module: {', '.join(sorted(missing))}")

    for index in range(len(obj.sections)):
        sec = obj.sections[index]
        if sec.type != SHT_RELA or sec.link != obj.symtab_index or sec.flags & SHF_RELA_LIVEPATCH:
            continue
        relas = obj.relocations(index)
        keep = [r for r in relas if r.sym not in klp_index]
        if len(keep) == len(relas):
            continue
        target = obj.sections[sec.info]
        if not target.flags & SHF_ALLOC:
            # Debug info referring to the symbol: nothing runs it; drop those entries.
            obj.set_relocations(index, keep)
            continue
        moved: dict[str, list] = {}
        for r in relas:
            if r.sym in klp_index:
                moved.setdefault(klp_index[r.sym].rela_object, []).append(r)
        obj.set_relocations(index, keep)
        for objname, entries in moved.items():
            new = obj.add_section(Section(
                name=f".klp.rela.{objname}.{target.name}", type=SHT_RELA,
                flags=SHF_ALLOC | SHF_INFO_LINK | SHF_RELA_LIVEPATCH, addr=0, link=obj.symtab_index,
                info=sec.info, addralign=8, entsize=sec.entsize or RELA.size, data=b""))
            obj.set_relocations(new, entries)
    return obj.to_bytes()


def _check_module_objects(symbols: Iterable[KlpSymbol]) -> None:
    for s in symbols:
        if "." in s.object or "." in s.rela_object or "," in s.name:
            raise BuildError(f"livepatch symbol {s.name!r} of object {s.object!r} cannot be encoded")
        if s.object == VMLINUX and s.rela_object != VMLINUX:
            # klp_resolve_symbols refuses a vmlinux symbol in a module's relocation section.
            raise BuildError(f"livepatch symbol {s.name!r} of vmlinux cannot be tied to module {s.rela_object}")
