"""A target kernel's symbol table at link-time addresses, for reading its text out of vmlinux.

Debian ships no System.map and its vmlinux has no ``.symtab``: the only symbol table is the
running kernel's ``/proc/kallsyms``. Booted with ``nokaslr``, that table gives link-time
addresses, which locate each function's bytes in the vmlinux file (the fidelity check compares
them with a compiled object). So the lab boots the target once, the table is kept in the cache
as the plain ``/proc/kallsyms`` text, and later reads cost a parse, not a boot.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from elftools.elf.elffile import ELFFile

from dynamos.abi import TEXT_TYPES, VMLINUX
from dynamos.errors import TargetError
from dynamos.target.fetch import TargetKernel, cache_root
from dynamos.target.images import extract_vmlinux

KALLSYMS_FILE = "kallsyms"
# The symbol whose kallsyms address must equal the start of vmlinux's .text: proof of nokaslr.
ANCHOR_SYMBOL = "_text"


class Sym(NamedTuple):
    """One kallsyms line; ``size`` is derived (distance to the next higher address), not recorded.

    A tuple, not a dataclass: a table has 100,000 of them and tuples build several times faster.
    """

    addr: int
    type: str
    name: str
    size: int | None = None
    object: str = VMLINUX

    @property
    def is_text(self) -> bool:
        return self.type in TEXT_TYPES


class SymbolTable:
    """``/proc/kallsyms`` as lists per (object, name), in table order.

    Table order is livepatch's ``sympos`` order: the kernel numbers same-named symbols of one
    object in the order it walks its table, counting symbols of every type.
    """

    def __init__(self, symbols: Iterable[Sym]):
        self.symbols: list[Sym] = list(symbols)
        self._by_name: dict[tuple[str, str], list[int]] = {}
        for i, sym in enumerate(self.symbols):
            self._by_name.setdefault((sym.object, sym.name), []).append(i)

    @classmethod
    def parse(cls, text: str | bytes) -> SymbolTable:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        symbols = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            obj = VMLINUX
            if len(parts) > 3 and parts[3].startswith("[") and parts[3].endswith("]"):
                obj = parts[3][1:-1]
            symbols.append(Sym(int(parts[0], 16), parts[1], parts[2], None, obj))
        return cls(symbols)

    @classmethod
    def read(cls, path: Path) -> SymbolTable:
        return cls.parse(path.read_bytes())

    def __len__(self) -> int:
        return len(self.symbols)

    @cached_property
    def _addresses(self) -> dict[str, list[int]]:
        """Sorted distinct addresses per object: the next one bounds a symbol's size."""
        per_object: dict[str, set[int]] = {}
        for sym in self.symbols:
            per_object.setdefault(sym.object, set()).add(sym.addr)
        return {obj: sorted(addrs) for obj, addrs in per_object.items()}

    def size_of(self, sym: Sym) -> int | None:
        """Bytes up to the next symbol of the same object (None for the last one).

        An upper bound: alignment padding and unnamed code (``.cold`` parts are named) follow.
        """
        addrs = self._addresses.get(sym.object, [])
        i = bisect.bisect_right(addrs, sym.addr)
        return addrs[i] - sym.addr if i < len(addrs) else None

    def lookup(self, name: str, object: str = VMLINUX) -> list[Sym]:
        """Every symbol called ``name`` in ``object``, in table order, sizes filled in."""
        return [s._replace(size=self.size_of(s)) for s in (self.symbols[i] for i in
                                                            self._by_name.get((object, name), ()))]

    def sympos(self, sym: Sym) -> int:
        """1-based position of ``sym`` among its same-named symbols (livepatch's ``sympos``)."""
        same = self._by_name.get((sym.object, sym.name), [])
        for pos, i in enumerate(same, 1):
            if self.symbols[i].addr == sym.addr and self.symbols[i].type == sym.type:
                return pos
        raise KeyError(f"{sym.name} at {sym.addr:#x} is not in the table")

    def unique_address(self, name: str, object: str = VMLINUX) -> int | None:
        """The address of ``name`` when exactly one symbol has that name, else None."""
        same = self._by_name.get((object, name), [])
        return self.symbols[same[0]].addr if len(same) == 1 else None


def kallsyms_path(target: TargetKernel) -> Path:
    return cache_root() / "kernels" / target.release / KALLSYMS_FILE


def vmlinux_text_address(target: TargetKernel) -> int | None:
    """Where vmlinux links ``.text``: with ``nokaslr``, kallsyms shows ``_text`` there."""
    with open(extract_vmlinux(target), "rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        return text["sh_addr"] if text is not None else None


def check_link_time(table: SymbolTable, link_text: int | None, release: str) -> None:
    """Addresses must be the vmlinux link addresses: not hidden (kptr_restrict), not randomised."""
    found = table.lookup(ANCHOR_SYMBOL)
    if not found or found[0].addr == 0:
        raise TargetError(f"the lab's /proc/kallsyms of {release} shows no address for {ANCHOR_SYMBOL} "
                          f"(addresses hidden?)")
    if link_text is not None and found[0].addr != link_text:
        raise TargetError(f"the lab's {ANCHOR_SYMBOL} of {release} is at {found[0].addr:#x}, vmlinux "
                          f"links .text at {link_text:#x}: the kernel was not booted with nokaslr")
