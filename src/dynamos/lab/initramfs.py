"""The lab's initramfs, written in pure Python (newc cpio): busybox, an init script, and the
target kernel's own virtio/9p modules so the guest can mount the host's root."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from dynamos.errors import LabError
from dynamos.target import TargetKernel

# Modules the guest needs before it can reach the host: PCI virtio transport, the
# virtio-serial command channel, 9p over virtio, and overlay for the writable /lib/modules
# (see dynamos.lab.modules).  Dependencies are added from .modinfo.
LAB_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay")
# A system lab (root on a disk image, see sysimage.py) also needs the disk and its filesystem.
DISK_MODULES = ("virtio_blk", "crc32c_generic", "ext4")

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


def _modinfo(path: Path) -> dict[str, str]:
    """Key/value pairs of a module's .modinfo section (no kmod tools needed)."""
    with path.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        if section is None:
            return {}
        data = section.data()
    info: dict[str, str] = {}
    for entry in data.split(b"\0"):
        if b"=" in entry:
            key, _, value = entry.decode(errors="replace").partition("=")
            info.setdefault(key, value)
    return info


def module_load_order(target: TargetKernel, wanted: Iterable[str] = LAB_MODULES) -> list[Path]:
    """Module files in an order that satisfies ``depends=`` (dependencies first).

    Modules built into the kernel are skipped: they need no loading.
    """
    builtin: set[str] = set()
    if target.modules_dir is not None:
        builtin_file = target.modules_dir / "modules.builtin"
        if builtin_file.exists():
            builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
                       for line in builtin_file.read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        if key in chain:
            raise LabError(f"module dependency cycle: {' -> '.join(chain + (key,))}")
        path = target.module_path(key)
        for dep in filter(None, _modinfo(path).get("depends", "").split(",")):
            visit(dep, chain + (key,))
        seen.add(key)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


@dataclass
class CpioWriter:
    """Minimal newc writer: enough for directories, regular files and symlinks."""

    buf: io.BytesIO = field(default_factory=io.BytesIO)
    ino: int = 1

    def _header(self, name: str, mode: int, size: int, nlink: int = 1) -> None:
        fields = (self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        self._header(name, stat.S_IFDIR | 0o755, 0, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | mode, len(data))
        self.buf.write(data)
        self._pad()

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self.buf.write(data)
        self._pad()

    def finish(self) -> bytes:
        self._header("TRAILER!!!", 0, 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def find_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        if cand.is_file():
            return cand
    raise LabError("busybox not found: install the busybox-static package")


# The applets /init uses, linked at build time: `busybox --install` would cost ~0.1 s per boot.
INIT_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "chroot", "switch_root", "poweroff", "hostname", "cat")


def build_initramfs(target: TargetKernel, init_script: str, wanted: Iterable[str] = LAB_MODULES) -> bytes:
    """An initramfs holding busybox, ``/init`` and the modules the lab needs, in load order."""
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.file("bin/busybox", find_busybox().read_bytes(), 0o755)
    for applet in INIT_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    modules = module_load_order(target, wanted)
    names = []
    for i, path in enumerate(modules):
        name = f"{i:02d}-{path.name}"
        cpio.file(f"lib/modules/{name}", path.read_bytes())
        names.append(name)
    cpio.file("lib/modules/order", ("\n".join(names) + "\n").encode())
    cpio.file("init", init_script.encode(), 0o755)
    return cpio.finish()


def files_cpio(files: dict[str, bytes]) -> bytes:
    """A small archive to append to a cached initramfs: the kernel unpacks both, in order."""
    cpio = CpioWriter()
    for name, data in files.items():
        cpio.file(name, data)
    return cpio.finish()


def cached_initramfs(target: TargetKernel, init_script: str, cache_dir: Path,
                     wanted: tuple[str, ...] = LAB_MODULES) -> Path:
    """The base initramfs for this kernel and init script, built once and kept in ``cache_dir``.

    Finding the modules' dependency order means reading every module's .modinfo and walking
    the module tree: ~0.2 s that every boot would otherwise pay.
    """
    busybox = find_busybox()
    st = busybox.stat()
    key = hashlib.sha256("\0".join([
        target.release, str(target.modules_dir), init_script, str(busybox), str(st.st_size), str(st.st_mtime_ns),
        ",".join(wanted), ",".join(INIT_APPLETS),
    ]).encode()).hexdigest()[:16]
    path = cache_dir / f"initramfs-{target.release}-{key}.cpio"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(build_initramfs(target, init_script, wanted))
        tmp.rename(path)
    return path
