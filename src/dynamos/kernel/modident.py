"""A module's own name, read from its ELF image with the standard library only.

The kernel names a module (and so its livepatch) after ``.gnu.linkonce.this_module`` (the
``name`` field of ``struct module``) and checks ``.modinfo``'s ``name=`` against it; a package
whose manifest says otherwise would load something dynamos then cannot find, wait for or unload.
The production host does not carry pyelftools, hence this small section reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

THIS_MODULE = ".gnu.linkonce.this_module"
MODULE_NAME_OFFSET = 24  # x86-64 struct module: enum state (4) + pad (4) + list_head (16), then name
MODULE_NAME_LEN = 56  # MODULE_NAME_LEN = 64 - sizeof(unsigned long)


@dataclass(frozen=True)
class ModuleIdentity:
    this_module: str | None  # name in struct module (what the kernel registers)
    modinfo: str | None  # name= in .modinfo (absent in some builds)


def elf_sections(image: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 image; ValueError if it is not one."""
    if image[:4] != b"\x7fELF" or len(image) < 64:
        raise ValueError("not an ELF image")
    if image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian 64-bit ELF image")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    if shentsize != 64 or shoff + shnum * 64 > len(image) or shstrndx >= shnum:
        raise ValueError("truncated or malformed section header table")
    headers = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * 64) for i in range(shnum)]

    def contents(h: tuple[int, ...]) -> bytes:
        offset, size = h[4], h[5]
        if h[1] == 8:  # SHT_NOBITS
            return b""
        if offset + size > len(image):
            raise ValueError("a section runs past the end of the image")
        return image[offset:offset + size]

    names = contents(headers[shstrndx])
    out = {}
    for h in headers[1:]:
        end = names.find(b"\0", h[0])
        out[names[h[0]:end if end >= 0 else None].decode(errors="replace")] = contents(h)
    return out


def module_identity(image: bytes) -> ModuleIdentity:
    """The names a module image gives itself; ValueError if the image cannot be read."""
    sections = elf_sections(image)
    this = sections.get(THIS_MODULE)
    own = None
    if this is not None and len(this) >= MODULE_NAME_OFFSET + 1:
        raw = this[MODULE_NAME_OFFSET:MODULE_NAME_OFFSET + MODULE_NAME_LEN]
        own = raw.split(b"\0", 1)[0].decode(errors="replace") or None
    modinfo = None
    for entry in sections.get(".modinfo", b"").split(b"\0"):
        if entry.startswith(b"name="):
            modinfo = entry[5:].decode(errors="replace")
    return ModuleIdentity(own, modinfo)


def identity_problem(image: bytes, expected: str) -> str | None:
    """Why the module would not register as ``expected`` (None: it would)."""
    try:
        ident = module_identity(image)
    except ValueError as e:
        return f"its module image cannot be read ({e})"
    if ident.this_module is None:
        return f"its module has no {THIS_MODULE} name"
    if ident.this_module != expected:
        return f"its module names itself {ident.this_module} ({THIS_MODULE}), not {expected}"
    if ident.modinfo is not None and ident.modinfo != expected:
        return f"its module's .modinfo says name={ident.modinfo}, not {expected}"
    return None
