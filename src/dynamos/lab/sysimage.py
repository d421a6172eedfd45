"""The system lab's root: a real Debian 12 system on an ext4 disk image, booted with systemd as PID 1.

The ordinary lab runs the host's files over 9p under a busybox init; that cannot show what a
production host does at boot (``dynamos.service`` ordering, the trust store in its own ``/etc``,
the ``.deb`` installed with dpkg). This root is made once with ``mmdebstrap`` (variant minbase plus
systemd, python3, kmod and gpgv) into the dynamos cache, never the host's root, and written into an
ext4 image with ``mke2fs -d``; each lab boots a sparse copy of it. The guest agent is started by a
systemd unit of the image over the same virtio-serial port, so ``Lab.run`` works unchanged; the
lab's initramfs mounts the disk and the target's modules and hands over to ``/sbin/init``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from dynamos.errors import LabError
from dynamos.target import cache_root

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "python3", "kmod", "gpgv")
IMAGE_SIZE = "2G"  # sparse: ~300 MB of it is used
AGENT_DIR = "/opt/dynamos-lab"
AGENT_UNIT = f"""\
# The dynamos lab agent: runs the host's commands over virtio-serial (dynamos/lab/agent.py).
# After dynamos.service, so the first command sees the kernel as boot left it.
[Unit]
Description=dynamos lab agent
After=dynamos.service local-fs.target systemd-udevd.service

[Service]
ExecStart=/usr/bin/python3 -S -E {AGENT_DIR}/agent.py
Restart=on-failure
Environment=HOME=/root

[Install]
WantedBy=multi-user.target
"""
# Units a lab does not need that cost boot time under TCG (timers that would run apt, getty on
# the serial console the lab uses for its log).
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
          "serial-getty@ttyS0.service", "getty@tty1.service", "systemd-timesyncd.service", "fstrim.timer")


def _lab_dir() -> Path:
    return Path(__file__).resolve().parent


def image_key() -> str:
    """Changes whenever what goes into the image does."""
    h = hashlib.sha256()
    for part in (SUITE, ",".join(PACKAGES), IMAGE_SIZE, AGENT_UNIT, ",".join(MASKED), "v1"):
        h.update(part.encode() + b"\0")
    for name in ("agent.py", "protocol.py"):
        h.update((_lab_dir() / name).read_bytes())
    return h.hexdigest()[:16]


def customize(root: Path) -> None:
    """What the image holds besides Debian's packages: the agent and its unit, masked units."""
    agent = root / AGENT_DIR.lstrip("/")
    agent.mkdir(parents=True, exist_ok=True)
    for name in ("agent.py", "protocol.py"):
        shutil.copyfile(_lab_dir() / name, agent / name)
    units = root / "etc/systemd/system"
    (units / "dynamos-lab-agent.service").write_text(AGENT_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "dynamos-lab-agent.service").symlink_to("/etc/systemd/system/dynamos-lab-agent.service")
    for unit in MASKED:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "etc/hostname").write_text("dynamos-syslab\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
    (root / "usr/lib/modules").mkdir(parents=True, exist_ok=True)  # the target's modules are mounted here


def system_image(progress: Callable[[str], None] | None = None) -> Path:
    """The cached root image (built on first use, ~1 min); boot a copy (``copy_image``)."""
    say = progress or (lambda _m: None)
    directory = cache_root() / "sysroot"
    path = directory / f"{SUITE}-{image_key()}.ext4"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller finds it made
        if path.exists():
            return path
        for tool in ("mmdebstrap", "mke2fs"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: install the {'mmdebstrap' if tool == 'mmdebstrap' else 'e2fsprogs'} "
                               "package (scripts/setup does)")
        work = directory / f".build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            root = work / "root"
            say(f"making the system lab's root with mmdebstrap ({SUITE}, minbase + {', '.join(PACKAGES)})")
            _run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  SUITE, str(root)], "mmdebstrap")
            customize(root)
            image = work / "root.ext4"
            say(f"writing it into an ext4 image ({IMAGE_SIZE}, sparse)")
            _run(["mke2fs", "-q", "-t", "ext4", "-L", "dynamos-root", "-d", str(root), str(image), IMAGE_SIZE],
                 "mke2fs")
            image.rename(path)
            for stale in directory.glob(f"{SUITE}-*.ext4"):  # images of an earlier agent or package list
                if stale != path:
                    stale.unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


def copy_image(dest: Path, progress: Callable[[str], None] | None = None) -> Path:
    """A sparse copy of the cached root image to boot (and reboot) from; the cache stays pristine."""
    source = system_image(progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "--sparse=always", str(source), str(dest)], "cp")
    return dest


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{what} failed (status {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
