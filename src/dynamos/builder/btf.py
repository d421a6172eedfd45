"""A small reader of the kernel's BTF, to render kernel function prototypes as C text.

A dispatcher must have exactly the prototype of the kernel function it stands in for, yet it
is compiled in a translation unit that includes only <linux/kernel.h>, <linux/module.h> and
<linux/types.h>. So prototypes are rendered from BTF in a header-independent, ABI-equivalent
form for x86-64: typedefs and enums become the integers they are, named structs and unions are
only pointed to (and forward-declared), and any other pointer becomes ``void *``. What cannot
be forwarded that way (by-value aggregates, floating point) is refused with a BtfError.

Format: Documentation/bpf/btf.rst and include/uapi/linux/btf.h. A module's BTF is *split* BTF
on top of vmlinux's: its type ids continue after the base's last id and its string offsets
after the end of the base's string section.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from dynamos.errors import BuildError

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO,
 VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)
# 32-bit words after the 3-word common header: fixed, and per vlen entry; indexed by kind.
_FIXED = (0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0)
_PER_VLEN = (0, 0, 0, 0, 3, 3, 2, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 0, 0, 3)
_TRANSPARENT = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)  # do not change the ABI
_QUALIFIER = {CONST: "const", VOLATILE: "volatile"}
_INT_NAMES = {
    "long int": "long", "long unsigned int": "unsigned long", "long long int": "long long",
    "long long unsigned int": "unsigned long long", "short int": "short",
    "short unsigned int": "unsigned short", "__int128 unsigned": "unsigned __int128",
    **{n: n for n in ("_Bool", "char", "signed char", "unsigned char", "int", "unsigned int",
                      "long", "unsigned long", "long long", "unsigned long long", "short",
                      "unsigned short", "__int128", "unsigned __int128")},
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # names pasted into C must be nothing else
_INT_BY_SIZE = {1: "signed char", 2: "short", 4: "int", 8: "long", 16: "__int128"}


class BtfError(BuildError):
    """BTF is missing or malformed, or a function's prototype cannot be forwarded."""

    def __init__(self, message: str, *, reason: str = "error") -> None:
        self.reason = reason  # a short category ("by-value struct", "float", ...) for reports
        super().__init__(message)


@dataclass(frozen=True)
class Param:
    name: str  # the BTF name, or ``arg{i}`` when BTF has none
    decl: str  # the full C declaration, name included: ``struct kiocb *iocb``


@dataclass(frozen=True)
class Prototype:
    name: str
    return_type: str
    params: tuple[Param, ...]
    variadic: bool
    forward_declarations: tuple[str, ...]  # ``struct kiocb;`` ..., needed before the declaration

    def declaration(self, name: str, storage: str = "") -> str:
        """``static long name(struct kiocb *iocb, struct iov_iter *from)``: a function with this prototype."""
        params = ", ".join(p.decl for p in self.params) or ("" if self.variadic else "void")
        if self.variadic:
            params += ", ..." if self.params else "..."
        return (f"{storage} " if storage else "") + _declare(self.return_type, f"{name}({params})")

    def argument_list(self) -> str:
        """``iocb, from``: the parameters forwarded, in order."""
        return ", ".join(p.name for p in self.params)


def _signature(p: Prototype) -> tuple[str, tuple[str, ...], bool]:
    return p.return_type, tuple(q.decl.removesuffix(q.name) for q in p.params), p.variadic


def _declare(type_text: str, declarator: str) -> str:
    return f"{type_text}{declarator}" if type_text.endswith("*") else f"{type_text} {declarator}"


def _pointer_to(type_text: str) -> str:
    return _declare(type_text, "*")


class BtfTypes:
    """The types of one BTF blob (plus its base, for split BTF), indexed lazily by need."""

    def __init__(self, data: bytes, source: str, base: BtfTypes | None = None) -> None:
        self.source, self._base = source, base
        if len(data) < _HEADER.size:
            raise BtfError(f"{source}: BTF data is truncated", reason="malformed")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != 1:
            raise BtfError(f"{source}: not little-endian BTF version 1 (magic {magic:#x})", reason="malformed")
        if hdr_len < _HEADER.size:
            raise BtfError(f"{source}: the BTF header is only {hdr_len} bytes long", reason="malformed")
        types_start, str_start = hdr_len + type_off, hdr_len + str_off
        if type_len % 4 or types_start + type_len > len(data) or str_start + str_len > len(data):
            raise BtfError(f"{source}: BTF sections lie outside the data", reason="malformed")
        self._strings = bytes(data[str_start:str_start + str_len])
        if base is None and self._strings[:1] not in (b"", b"\0"):
            raise BtfError(f"{source}: this is split BTF (a module's): read it with base= the vmlinux BTF",
                           reason="malformed")
        self._first_id = base._first_id + len(base._offsets) if base else 1
        self._first_str = base._first_str + len(base._strings) if base else 0
        self._words = array("I", bytes(data[types_start:types_start + type_len]))
        if sys.byteorder == "big":
            self._words.byteswap()
        self._offsets, self._funcs = array("I"), array("I")
        words, offsets, i, n = self._words, self._offsets, 0, len(self._words)
        while i < n:  # one pass records where each type starts, skipping member data
            offsets.append(i)
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            if kind == FUNC:
                self._funcs.append(self._first_id + len(offsets) - 1)
            elif not 0 < kind <= ENUM64:
                raise BtfError(f"{source}: unknown BTF kind {kind} at type {self._first_id + len(offsets) - 1}",
                               reason="malformed")
            i += 3 + _FIXED[kind] + _PER_VLEN[kind] * (info & 0xFFFF)
        if i != n:
            raise BtfError(f"{source}: the last BTF type runs past the type section", reason="malformed")
        self._by_name: dict[str, list[int]] | None = None

    @classmethod
    def from_bytes(cls, data: bytes, base: BtfTypes | None = None, source: str = "BTF data") -> BtfTypes:
        """Types of a raw BTF blob, such as /sys/kernel/btf/vmlinux (or a module's, with ``base``)."""
        return cls(data, source, base)

    @classmethod
    def from_elf(cls, path: Path | str, base: BtfTypes | None = None) -> BtfTypes:
        """Types of the ``.BTF`` section of vmlinux, or of a module (``.ko``, ``.ko.xz``, ``.ko.gz``) over ``base``."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(6)
                f.seek(0)
                if head.startswith(b"\xfd7zXZ\x00") or head.startswith(b"\x1f\x8b"):
                    raw = f.read()
                    opened = io.BytesIO(lzma.decompress(raw) if head[0] == 0xFD else gzip.decompress(raw))
                    section = ELFFile(opened).get_section_by_name(".BTF")
                else:
                    section = ELFFile(f).get_section_by_name(".BTF")
                data = section.data() if section is not None else None
        except (OSError, ELFError, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise BtfError(f"cannot read {path}: {e}", reason="malformed") from e
        if data is None:
            raise BtfError(f"{path} has no .BTF section (kernel built without CONFIG_DEBUG_INFO_BTF?)",
                           reason="malformed")
        return cls(data, str(path), base)

    # -- raw access ---------------------------------------------------------------------------

    def _string(self, offset: int) -> str:
        if offset < self._first_str:
            return self._base._string(offset)  # type: ignore[union-attr]  # (_first_str > 0 implies a base)
        start = offset - self._first_str
        end = self._strings.find(b"\0", start)
        if start >= len(self._strings) or end < 0:
            raise BtfError(f"{self.source}: string offset {offset} is out of range", reason="malformed")
        return self._strings[start:end].decode("utf-8", "replace")

    def _record(self, type_id: int) -> tuple[int, int, bool, str, int, array, int]:
        """(kind, vlen, kind_flag, name, size-or-type, words, index of the record in words)."""
        if type_id < self._first_id:
            if self._base is None:
                raise BtfError(f"{self.source}: type id {type_id} is out of range", reason="malformed")
            return self._base._record(type_id)
        if type_id - self._first_id >= len(self._offsets):
            raise BtfError(f"{self.source}: type id {type_id} is out of range", reason="malformed")
        words = self._words
        i = self._offsets[type_id - self._first_id]
        name_off, info, size_or_type = words[i], words[i + 1], words[i + 2]
        return (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31), self._string(name_off), size_or_type, words, i

    def function_names(self) -> list[str]:
        """Names of the functions this BTF itself describes (not its base's), sorted."""
        return sorted(self._index())

    def _index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            self._by_name = {}
            for tid in self._funcs:
                self._by_name.setdefault(self._string(self._words[self._offsets[tid - self._first_id]]), []).append(tid)
        return self._by_name

    # -- prototypes ---------------------------------------------------------------------------

    def functions(self, name: str) -> list[Prototype]:
        """Every BTF FUNC named ``name`` in this BTF (static functions may repeat), rendered."""
        return [self._prototype(name, tid) for tid in self._index().get(name, [])]

    def prototype(self, name: str) -> Prototype:
        """The one prototype of ``name``; several FUNCs are fine as long as they render alike."""
        # Static functions of one name in several files are told apart by their ABI only, not
        # by their parameter names (compat syscall stubs name theirs regs or __unused).
        distinct = list({_signature(p): p for p in reversed(self.functions(name))}.values())[::-1]
        if not distinct:
            raise BtfError(f"no BTF for function {name} in {self.source}", reason="missing")
        if len(distinct) > 1:
            shown = "; ".join(p.declaration(name) for p in distinct)
            raise BtfError(f"{name} has {len(distinct)} different prototypes in {self.source}: {shown}",
                           reason="ambiguous")
        return distinct[0]

    def _prototype(self, name: str, func_id: int) -> Prototype:
        proto_id = self._record(func_id)[4]
        kind, vlen, _, _, ret_id, words, i = self._record(proto_id)
        if kind != FUNC_PROTO:
            raise BtfError(f"{self.source}: function {name} has no FUNC_PROTO", reason="malformed")
        entries = [(self._string(words[i + 3 + 2 * k]), words[i + 4 + 2 * k]) for k in range(vlen)]
        variadic = bool(entries) and entries[-1][1] == 0
        if variadic:
            entries.pop()
        forwards: set[str] = set()
        what = f"function {name} in {self.source}"
        return_type = self._value(ret_id, forwards, f"return value of {what}", void_ok=True)
        used = {n for n, _ in entries if n}
        params = []
        for k, (pname, tid) in enumerate(entries):
            if not pname:
                pname = f"arg{k}"
                while pname in used:
                    pname += "_"
                used.add(pname)
            elif not _IDENT.fullmatch(pname):
                raise BtfError(f"{what} has a parameter named {pname!r}, not a C identifier", reason="malformed")
            text = self._value(tid, forwards, f"argument '{pname}' of {what}", void_ok=False)
            params.append(Param(pname, _declare(text, pname)))
        return Prototype(name, return_type, tuple(params), variadic, tuple(sorted(forwards)))

    def _resolve(self, type_id: int, what: str) -> tuple[int, tuple | None, list[str], str]:
        """Follow typedefs and qualifiers: (type id, its record, qualifiers met, first typedef name)."""
        quals: list[str] = []
        alias = ""
        for _ in range(64):
            if type_id == 0:
                return 0, None, quals, alias
            record = self._record(type_id)
            if record[0] not in _TRANSPARENT:
                return type_id, record, quals, alias
            alias = alias or (record[3] if record[0] == TYPEDEF else "")
            if record[0] in _QUALIFIER and _QUALIFIER[record[0]] not in quals:
                quals.append(_QUALIFIER[record[0]])
            type_id = record[4]
        raise BtfError(f"the type of {what} is a typedef/qualifier loop", reason="malformed")

    def _value(self, type_id: int, forwards: set[str], what: str, void_ok: bool) -> str:
        """C text of a parameter or return type: its own qualifiers dropped, typedefs resolved."""
        type_id, record, _, alias = self._resolve(type_id, what)
        if record is None:
            if void_ok:
                return "void"
            raise BtfError(f"{what} has type void", reason="malformed")
        kind, tname = record[0], record[3]
        if kind == PTR:
            return _pointer_to(self._pointee(record[4], forwards, what))
        if kind in (INT, ENUM, ENUM64):
            return self._integer(type_id, what)
        label = {STRUCT: "struct", UNION: "union", FWD: "struct", FLOAT: "floating-point", ARRAY: "array",
                 FUNC_PROTO: "function"}.get(kind)
        if label is None:
            raise BtfError(f"{what} has a non-type BTF kind {kind}", reason="malformed")
        label = "union" if kind == FWD and record[2] else label
        shown = f"{label} {tname}" if tname and kind in (STRUCT, UNION, FWD) else tname or alias
        raise BtfError(f"the dispatcher cannot forward a by-value {label} {what}" + (f" ({shown})" if shown else ""),
                       reason="float" if kind == FLOAT else f"by-value {label}")

    def _integer(self, type_id: int, what: str) -> str:
        kind, _, kflag, tname, size, words, i = self._record(type_id)
        if kind == INT:
            signed = bool((words[i + 3] >> 24) & 1)
            if tname in _INT_NAMES:
                return _INT_NAMES[tname]
        else:
            signed = kflag  # older BTF has no signedness for enums: unsigned is as good, ABI-wise
        if size not in _INT_BY_SIZE:
            raise BtfError(f"{what} is a {size}-byte integer, which has no C type", reason="odd integer")
        return _INT_BY_SIZE[size] if signed else "unsigned " + _INT_BY_SIZE[size].removeprefix("signed ")

    def _pointee(self, type_id: int, forwards: set[str], what: str, depth: int = 0) -> str:
        """C text of what a pointer points to; anything not nameable here becomes ``void``."""
        type_id, record, quals, _ = self._resolve(type_id, what)
        kind, _, kflag, tname = record[:4] if record else (0, 0, False, "")
        if kind == PTR:
            if depth > 16:
                raise BtfError(f"the type of {what} is a pointer chain too long", reason="malformed")
            return _pointer_to(self._pointee(record[4], forwards, what, depth + 1)) + " ".join(quals)
        if kind in (INT, ENUM, ENUM64):
            base = self._integer(type_id, what)
        elif kind == FLOAT and tname in ("float", "double", "long double"):
            base = tname
        elif kind in (STRUCT, UNION, FWD) and _IDENT.fullmatch(tname):
            tag = "union" if kind == UNION or (kind == FWD and kflag) else "struct"
            forwards.add(f"{tag} {tname};")
            base = f"{tag} {tname}"
        else:  # void, anonymous aggregates, functions, arrays: any data pointer has the same ABI
            base = "void"
        return " ".join([*quals, base])
