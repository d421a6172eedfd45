"""What a lab machine is made of: its settings, the host directories it sees, QEMU's command line
and the guest's own settings (``/lab.conf`` in the initramfs). ``vm`` runs such a machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.builder.signing import lab_signer
from dynamos.errors import LabError
from dynamos.lab.firmware import FIRMWARES, firmware_argv
from dynamos.lab.initramfs import DISK_MODULES, LAB_MODULES, cached_initramfs, files_cpio
from dynamos.lab.modules import MODULES_TAG
from dynamos.target import DEFAULT_LAB_KERNEL, TargetKernel, cache_root
from dynamos.target.images import extract_vmlinux

QEMU = "qemu-system-x86_64"


@dataclass
class LabConfig:
    """What to boot and how."""

    kernel: str = DEFAULT_LAB_KERNEL
    memory_mb: int = 1024
    cpus: int = 2
    shares: list[str] = field(default_factory=list)  # host dirs the guest sees read-only, at the same path
    outputs: list[str] = field(default_factory=list)  # host dirs the guest may write, at the same path
    accel: str | None = None  # "kvm" / "tcg"; None: decided by a cached probe
    boot_timeout: float = 60.0
    root_cache: str = "cache=loose"  # 9p cache mode of the read-only root share
    append: str = ""  # extra kernel command line
    tcg_threads: str = "multi"  # TCG: a host thread per vCPU ("multi") or all vCPUs on one ("single")
    # "pvh": the extracted vmlinux booted directly, no firmware; "uefi": Debian's OVMF starting the
    # bzImage through its EFI stub, with ``db_certs`` (PEM/DER files) enrolled in the UEFI db (see
    # lab.firmware: the kernel then trusts them for module signatures through .platform).
    firmware: str = "pvh"
    db_certs: list[str] = field(default_factory=list)

    disk: str | None = None  # a system lab: boot this root disk image with its own init (see sysimage.py)

    def check(self) -> None:
        if self.firmware not in FIRMWARES:
            raise LabError(f"lab firmware must be one of {', '.join(FIRMWARES)}, not {self.firmware!r}")
        if self.db_certs and self.firmware != "uefi":
            raise LabError("db certificates need the UEFI firmware (firmware='uefi')")
        if self.tcg_threads not in ("multi", "single"):
            raise LabError(f"tcg_threads must be multi or single, not {self.tcg_threads!r}")


def default_shares() -> list[str]:
    """The working directory and the dynamos cache: what a lab command usually needs to see."""
    return [os.getcwd(), str(cache_root())]


def normalise_shares(shares: Sequence[str], outputs: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """(path, writable) pairs in mount order: absolute, real, de-duplicated (an output wins over
    a read-only share of the same path), and a path nested in a share of the same kind dropped
    (that share covers it). An output inside a read-only share stays: it is mounted over it."""
    wanted: dict[str, bool] = {}
    for s, writable in [*((s, False) for s in shares), *((s, True) for s in outputs)]:
        p = os.path.realpath(s)
        if any(c.isspace() for c in p):
            raise LabError(f"cannot share {p!r}: paths with whitespace are not supported")
        if not os.path.isdir(p):
            raise LabError(f"cannot share {p}: not a directory")
        if p == "/" and not writable:
            continue  # already the root share
        if p == "/":
            raise LabError("the host root cannot be an output share: name the directories the guest may write")
        wanted[p] = wanted.get(p, False) or writable
    kept: list[tuple[str, bool]] = []
    for p in sorted(wanted):
        if not any(p.startswith(k + "/") and w == wanted[p] for k, w in kept):
            kept.append((p, wanted[p]))
    return kept


def option_value(value: str) -> str:
    """A value inside a QEMU ``-fsdev``/``-chardev`` option list: a comma is doubled, so a path
    cannot end the value and start an option of its own."""
    return value.replace(",", ",,")


# Where the guest's init puts tmpfs over the host's directories (see init.sh).
GUEST_TMPFS = ("/tmp", "/run", "/var/tmp", "/var/log", "/var/lib", "/var/cache")


def needed_shares() -> list[str]:
    """Host directories the guest must see but would not through the root share because the
    guest covers them with tmpfs: the agent's own code and the interpreter's environment, when
    dynamos runs from a checkout or venv under /tmp (as CI does)."""
    import dynamos

    wanted = [str(Path(dynamos.__file__).resolve().parents[1]), sys.prefix]
    return [p for p in wanted if any(p == t or p.startswith(t + "/") for t in GUEST_TMPFS)]


def agent_files() -> tuple[Path, Path]:
    here = Path(__file__).resolve().parent
    return here / "agent.py", here / "init.sh"


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise LabError(f"{QEMU} not found: install the qemu-system-x86 package")
    return path


def modules_share_argv(target: TargetKernel) -> list[str]:
    """QEMU options exporting the target's ``lib/modules`` read-only under :data:`MODULES_TAG`."""
    if target.modules_dir is None:
        return []
    path = option_value(str(target.modules_dir.parent))
    return ["-fsdev", f"local,id={MODULES_TAG},path={path},security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev={MODULES_TAG},mount_tag={MODULES_TAG}"]


def lab_initramfs(target: TargetKernel, shares: list[tuple[str, bool]], root_cache: str, disk: bool = False) -> bytes:
    """The cached base initramfs plus this lab's settings (``/lab.conf``) appended; with ``disk``,
    one that mounts the root disk (/dev/vda) and starts its init instead of the agent."""
    agent, init = agent_files()
    conf = "\n".join([
        f"SHARES={shlex.quote(' '.join(('rw:' if w else 'ro:') + p for p, w in shares))}",
        f"AGENT_PYTHON={shlex.quote(os.path.realpath(sys.executable))}",
        f"AGENT_PATH={shlex.quote(str(agent))}",
        f"ROOT_CACHE={shlex.quote(root_cache)}",
        f"DYNAMOS_CACHE={shlex.quote(str(cache_root()))}",
        f"MODULES_RELEASE={shlex.quote(target.release if target.modules_dir else '')}",
        f"TRUST_KEYRING={shlex.quote(str(lab_signer(cache_root()).trusted_keyring))}",
        f"ROOT_DISK={'/dev/vda' if disk else ''}",
    ]) + "\n"
    modules = LAB_MODULES + DISK_MODULES if disk else LAB_MODULES
    base = cached_initramfs(target, init.read_text(), cache_root() / "initramfs", modules)
    return base.read_bytes() + files_cpio({"lab.conf": conf.encode()})


def qemu_argv(target: TargetKernel, config: LabConfig, accel: str, state_dir: Path,
               initrd: Path, shares: list[tuple[str, bool]]) -> list[str]:
    config.check()
    uefi = config.firmware == "uefi"
    if uefi and target.image is None:
        raise LabError(f"UEFI lab: no bzImage known for kernel {target.release}")
    # PVH boot: no firmware, no in-guest decompression; UEFI: OVMF runs the bzImage's EFI stub.
    kernel_image = target.image if uefi else extract_vmlinux(target)
    cmdline = " ".join(arg for arg in [
        "console=ttyS0", "loglevel=5", "panic=-1", "rdinit=/init", "8250.nr_uarts=1",
        "tsc=reliable", "no_timer_check",
        "cryptomgr.notests",  # boot-time crypto self-tests: ~0.3 s under TCG, no bearing on updates
        # PCI IRQ routing from the BIOS table: ACPI link setup costs ~0.5 s under TCG. OVMF has no
        # such table, and without ACPI the kernel cannot claim the BARs OVMF assigned.
        "" if uefi else "pci=noacpi",
        config.append.strip(),
    ] if arg)
    argv = [
        qemu_binary(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # q35 under UEFI too: there its kernel reaches the agent ~0.8 s sooner than on pc (TCG).
        "-machine", "q35" if accel == "kvm" or uefi else "pc",
        "-m", str(config.memory_mb), "-smp", str(config.cpus),
        "-kernel", str(kernel_image), "-initrd", str(initrd), "-append", cmdline,
        "-serial", f"file:{state_dir / 'console.log'}",
        "-monitor", "none",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=ctl,path={option_value(str(state_dir / 'ctl.sock'))},server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=ctl,name=dynamos.ctl",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]
    argv += modules_share_argv(target)
    if uefi:
        argv += firmware_argv(config.db_certs, state_dir)
    if config.disk:  # the system lab's root (virtio-blk: /dev/vda); the guest's writes go to this file
        argv += ["-drive", f"file={option_value(config.disk)},format=raw,if=none,id=rootdisk,cache=writeback",
                 "-device", "virtio-blk-pci,drive=rootdisk"]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,thread={config.tcg_threads}", "-cpu", "max"]
    for i, (path, writable) in enumerate(shares):
        # An output maps the guest's owners and modes into xattrs (mapped-xattr): QEMU runs as
        # root, and with security_model=none a guest could leave a setuid-root file on the host.
        access = "security_model=mapped-xattr" if writable else "security_model=none,readonly=on"
        argv += ["-fsdev", f"local,id=share{i},path={option_value(path)},{access},multidevs=remap",
                 "-device", f"virtio-9p-pci,fsdev=share{i},mount_tag=share{i}"]
    return argv
