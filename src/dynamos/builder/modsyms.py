"""Symbols the changed code of a module uses from other modules (``md_write_end`` of md_mod, used by
raid10): livepatch symbols tied to the patched module, never left to the module loader.

The loader would link an exported one only if its module were loaded when the update loads, and
refuse the update otherwise (``Unknown symbol md_write_end``). Livepatch instead writes a module's
relocations (``.klp.rela.raid10.*``) when that module loads, and a module loads only after the
modules it depends on: so the relocation, naming the symbol's module (``.klp.sym.md_mod.
md_write_end,0``), is written in time, provided the target's ``modules.dep`` says the patched
module depends on the symbol's module. That is checked here; otherwise the build is refused.

vmlinux code is there before any module: a changed vmlinux function calling into a module is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from dynamos.abi import VMLINUX
from dynamos.builder.elf import SHN_UNDEF, STB_LOCAL, STT_FILE, STT_SECTION, RelocatableElf
from dynamos.builder.klp import KlpSymbol
from dynamos.errors import BuildError
from dynamos.target import TargetKernel

ModuleSymbols = list[tuple[str, bool]]  # a module's defined symbols in table order: (name, is global)


def module_name(path: str) -> str:
    """``kernel/drivers/md/md-mod.ko.xz`` -> ``md_mod`` (the name livepatch and the kernel use)."""
    base = path.rsplit("/", 1)[-1]
    base = base.split(".ko", 1)[0] if ".ko" in base else base
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, set[str]]:
    """Module -> every module it needs loaded first (depmod writes the whole closure per line)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        head, sep, deps = line.partition(":")
        if sep and head.strip():
            out[module_name(head.strip())] = {module_name(d) for d in deps.split()}
    return out


def defined_symbols(ko: bytes, where: str) -> ModuleSymbols:
    obj = RelocatableElf.parse(ko, where)
    return [(s.name, s.binding != STB_LOCAL) for s in obj.symbols
            if s.name and s.shndx != SHN_UNDEF and s.type not in (STT_FILE, STT_SECTION)]


class OtherModules:
    """What a patched module's new code finds in other modules: who exports a name (Module.symvers),
    which modules it depends on (modules.dep), and where a name sits in a module's symbol table."""

    def __init__(self, exporters: Mapping[str, str], depends: Mapping[str, set[str]] | None,
                 symbols_of: Callable[[str], ModuleSymbols], release: str = "the target"):
        self.exporters, self.depends, self.symbols_of, self.release = exporters, depends, symbols_of, release
        self._cache: dict[str, ModuleSymbols] = {}

    @classmethod
    def of_target(cls, target: TargetKernel, exporters: Mapping[str, str]) -> OtherModules:
        depends = None
        if target.modules_dir is not None and (target.modules_dir / "modules.dep").is_file():
            depends = parse_modules_dep((target.modules_dir / "modules.dep").read_text())

        def symbols_of(name: str) -> ModuleSymbols:
            path: Path = target.module_path(name)
            return defined_symbols(path.read_bytes(), path.name)
        return cls(exporters, depends, symbols_of, target.release)

    def exporter(self, name: str) -> str | None:
        """The object exporting ``name``, or None."""
        return self.exporters.get(name)

    def _symbols(self, module: str) -> ModuleSymbols:
        if module not in self._cache:
            self._cache[module] = self.symbols_of(module)
        return self._cache[module]

    def _dependencies(self, unit: str, patched: str) -> set[str]:
        if self.depends is None:
            raise BuildError(f"{unit}: no modules.dep of kernel {self.release}: cannot tell which modules "
                             f"{patched} depends on")
        return self.depends.get(patched, set())

    def symbol(self, unit: str, patched: str, name: str, home: str) -> KlpSymbol:
        """``name`` of module ``home``, used by new code of ``patched`` (compiled from ``unit``)."""
        if patched == VMLINUX:
            raise BuildError(f"{unit}: the changed vmlinux code would use {name} of module {home}: vmlinux "
                             f"code runs whether or not {home} is loaded, and livepatch can resolve {name} "
                             f"only once {home} loads; an update cannot carry that (patch {home}'s caller "
                             f"in a module instead)")
        if home not in self._dependencies(unit, patched):
            raise BuildError(f"{unit}: the changed code of module {patched} uses {name} of module {home}, "
                             f"but {patched} does not depend on {home} (modules.dep of {self.release}): "
                             f"nothing makes sure {home} is loaded when livepatch resolves {name} as "
                             f"{patched} loads")
        return KlpSymbol(name, home, self._position(unit, home, name), patched=patched)

    def defined_by_dependency(self, unit: str, patched: str, name: str) -> KlpSymbol | None:
        """A global ``name`` no one exports, defined by exactly one module ``patched`` depends on."""
        if patched == VMLINUX:
            return None
        homes = [m for m in sorted(self._dependencies(unit, patched))
                 if (name, True) in self._symbols(m)]
        if len(homes) > 1:
            raise BuildError(f"{unit}: {name} is defined by modules {', '.join(homes)}, all of which "
                             f"{patched} depends on: which one the code means cannot be told")
        return self.symbol(unit, patched, name, homes[0]) if homes else None

    def _position(self, unit: str, home: str, name: str) -> int:
        """0 when ``name`` is unique in ``home``, else the global's 1-based place among namesakes."""
        namesakes = [is_global for n, is_global in self._symbols(home) if n == name]
        if not namesakes:
            raise BuildError(f"{unit}: module {home} of kernel {self.release} defines no {name}")
        if len(namesakes) == 1:
            return 0
        if namesakes.count(True) != 1:
            raise BuildError(f"{unit}: {len(namesakes)} symbols of module {home} are named {name}: which "
                             f"one the code means cannot be told")
        return namesakes.index(True) + 1
