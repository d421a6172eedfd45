"""Images of a target kernel: its vmlinux (extracted from vmlinuz) and its text at link-time addresses.

The lab boots the extracted vmlinux; the fidelity check reads the kernel's bytes out of it.
"""

from __future__ import annotations

import lzma
import mmap
from collections.abc import Iterable
from pathlib import Path

from elftools.elf.elffile import ELFFile

from dynamos.errors import TargetError
from dynamos.target.fetch import TargetKernel

SHF_ALLOC = 0x2

_XZ_MAGIC = b"\xfd7zXZ\x00"


def extract_vmlinux(target: TargetKernel) -> Path:
    """The uncompressed kernel ELF inside vmlinuz, cached beside it.

    The lab boots it directly through its PVH entry, which skips firmware and in-guest
    decompression (about a second under TCG); it is also the kernel text of record.
    """
    if target.image is None:
        raise TargetError(f"no kernel image known for {target.release}")
    out = target.image.with_name(target.image.name.replace("vmlinuz", "vmlinux"))
    if out == target.image:
        out = target.image.with_name(target.image.name + ".elf")
    if out.exists():
        return out
    data = target.image.read_bytes()
    start = data.find(_XZ_MAGIC)
    if start < 0:
        raise TargetError(f"{target.image}: no xz-compressed kernel inside (only xz is supported)")
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError as e:
        raise TargetError(f"{target.image}: cannot decompress the kernel: {e}") from e
    if not elf.startswith(b"\x7fELF"):
        raise TargetError(f"{target.image}: decompressed payload is not an ELF kernel")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(elf)
    tmp.rename(out)
    return out




class KernelText:
    """Bytes of the kernel image at link-time addresses: ``(start, end, offset, name)`` ranges
    over an image (the vmlinux file, mapped, through its allocated sections)."""

    def __init__(self, image: bytes | mmap.mmap, ranges: Iterable[tuple[int, int, int, str]], name: str = "kernel"):
        self.image = image
        self.ranges = sorted(ranges)
        self.name = name

    @classmethod
    def open(cls, path: Path) -> KernelText:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            # Allocated sections with contents. Per-cpu data links at 0 and kallsyms shows per-cpu
            # variables at offsets from 0: its template is addressable the same way.
            ranges = [(s["sh_addr"], s["sh_addr"] + s["sh_size"], s["sh_offset"], s.name)
                      for s in elf.iter_sections() if s["sh_flags"] & SHF_ALLOC and s["sh_type"] == "SHT_PROGBITS"]
            image = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after close
        return cls(image, ranges, str(path))

    def section_at(self, addr: int) -> tuple[int, int, int, str] | None:
        for start, end, offset, name in self.ranges:
            if start <= addr < end:
                return start, end, offset, name
        return None

    def read(self, addr: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``addr``; fewer when the section ends first."""
        found = self.section_at(addr)
        if found is None:
            raise TargetError(f"{self.name}: no section holds address {addr:#x}")
        start, end, offset, _name = found
        size = min(size, end - addr)
        return bytes(self.image[offset + addr - start:offset + addr - start + size])

    def peek(self, addr: int, size: int) -> bytes:
        """Like ``read``, but empty where no section holds ``addr``."""
        return self.read(addr, size) if self.section_at(addr) else b""


def kernel_text(target: TargetKernel) -> KernelText:
    """The target's vmlinux (extracted from vmlinuz and cached) as addressable text."""
    return KernelText.open(extract_vmlinux(target))
