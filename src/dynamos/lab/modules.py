"""The target kernel's own modules at ``/lib/modules/<release>`` in the guest, so ``modprobe``,
``modinfo`` and ``depmod`` work there as on a host running that kernel.

How: the cache's ``lib/modules`` of the target is a read-only 9p share (tag ``modules``), and
the guest's init mounts an overlay at ``/lib/modules`` with that share as its lower layer and a
guest tmpfs as its upper layer.  Why an overlay and not a writable share: a test may add modules
(``/lib/modules/<release>/extra``) and run ``depmod``, and those writes must land in guest
memory, never in the host's cache, which other labs and builds read at the same time.  Why not a
copy into the initramfs: the tree is ~400 MiB; the overlay reads only what the guest opens.

Debian's package is unpacked with ``dpkg -x`` (no maintainer scripts), so the module index that
``depmod`` would have written at install time is missing: the host writes it once per release
(:func:`ensure_module_index`), as the package's postinst would have, before the first lab boots.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamos.errors import LabError
from dynamos.target import TargetKernel

MODULES_TAG = "modules"  # 9p mount tag of the modules share (init.sh mounts it)

# What modprobe reads: its dependency index.  The others (aliases, symbols) come with it.
_INDEX = "modules.dep.bin"
# What the kernel package itself ships beside the module directories (depmod writes the rest).
_PACKAGED = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


def find_depmod() -> str | None:
    """kmod's depmod: /sbin is not on every PATH (a non-login shell, CI), so look there too."""
    return shutil.which("depmod", path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def index_is_current(modules_dir: Path) -> bool:
    """True when the module index is there and newer than the package's module list."""
    try:
        return (modules_dir / _INDEX).stat().st_mtime_ns >= (modules_dir / "modules.order").stat().st_mtime_ns
    except FileNotFoundError:
        return False


def ensure_module_index(target: TargetKernel, progress: Callable[[str], None] | None = None) -> bool:
    """Write the target's module index (``depmod``) into the cache once; False when it cannot be
    written here (no kmod on the host): the modules are still visible in the guest, but
    ``modprobe`` there will not find them, and ``progress`` says so."""
    say = progress or (lambda _m: None)
    modules_dir = target.modules_dir
    if modules_dir is None or index_is_current(modules_dir):
        return modules_dir is not None
    depmod = find_depmod()
    if depmod is None:
        say("no depmod on this host (install kmod): modprobe in the lab will not find the target's modules")
        return False
    base = modules_dir.parents[2]  # <base>/lib/modules/<release>
    if modules_dir != base / "lib" / "modules" / target.release:
        raise LabError(f"unexpected module tree layout: {modules_dir}")
    with open(modules_dir.parent / ".depmod.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two labs booting at once index once
        if not index_is_current(modules_dir):
            say(f"indexing the modules of {target.release} (depmod, once per kernel)")
            r = subprocess.run([depmod, "-b", str(base), target.release], capture_output=True, text=True)
            if r.returncode != 0:
                raise LabError(f"depmod failed for {target.release}: {r.stderr.strip()}")
    return True


@dataclass(frozen=True)
class StagedModules:
    """Extra modules and a module index covering them and the target's own, staged on the host
    in a directory the guest sees, ready to copy into the guest's ``/lib/modules/<release>``.

    Why stage on the host: ``depmod`` in the guest reads every module of the tree over 9p, ~27 s
    under TCG; the host's depmod (the same kmod binary the guest runs) does it in ~0.5 s.
    """

    release: str
    root: Path  # the staged lib/modules/<release>
    subdir: str  # where the extra modules go, relative to it (``extra/...``)
    modules: tuple[str, ...]  # their file names
    index: tuple[str, ...]  # the index files depmod wrote

    def install_script(self) -> str:
        """Shell for the guest: copy the modules and the index into ``/lib/modules/<release>``."""
        dest = f"/lib/modules/{self.release}"
        q = shlex.quote
        modules = " ".join(q(str(self.root / self.subdir / m)) for m in self.modules)
        index = " ".join(q(str(self.root / f)) for f in self.index)
        return (f"set -e\nmkdir -p {q(f'{dest}/{self.subdir}')}\n"
                f"cp {modules} {q(f'{dest}/{self.subdir}/')}\ncp {index} {q(dest + '/')}\n")


def stage_modules(target: TargetKernel, modules: Sequence[Path], stage: Path,
                  subdir: str = "extra") -> StagedModules:
    """Index ``modules`` together with the target's own (``depmod`` on a tree in ``stage`` that
    links to the cache's modules and holds copies of these under ``subdir``)."""
    if target.modules_dir is None:
        raise LabError(f"no module tree known for kernel {target.release}")
    parts = Path(subdir).parts
    if not parts or Path(subdir).is_absolute() or ".." in parts:
        raise LabError(f"module subdirectory must be relative and inside the tree: {subdir!r}")
    names = [m.name for m in modules]
    if not names or len(set(names)) != len(names) or not all(n.endswith(".ko") for n in names):
        raise LabError(f"expected distinct .ko files, got {names}")
    if (target.modules_dir / parts[0]).exists():
        raise LabError(f"{parts[0]} is part of the target's module tree: stage the modules elsewhere")
    depmod = find_depmod()
    if depmod is None:
        raise LabError("no depmod on this host: install the kmod package")
    root = stage / "lib" / "modules" / target.release
    if root.exists():
        shutil.rmtree(root)
    (root / subdir).mkdir(parents=True)
    for entry in target.modules_dir.iterdir():  # the target's tree, linked (depmod follows links)
        if entry.name in _PACKAGED or (entry.is_dir() and not entry.is_symlink()):
            (root / entry.name).symlink_to(entry)
    for m in modules:
        shutil.copy(m, root / subdir / m.name)
    r = subprocess.run([depmod, "-b", str(stage), target.release], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"depmod failed on the staged modules: {r.stderr.strip()}")
    index = tuple(sorted(p.name for p in root.glob("modules.*") if not p.is_symlink()))
    return StagedModules(target.release, root, subdir, tuple(names), index)
