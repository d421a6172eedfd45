"""Target kernels: a release plus what is needed to build for it and boot it in the lab.

A lab kernel comes from the distribution's own packages (``linux-image-<rel>``,
``linux-headers-<rel>`` and their dependencies), fetched with ``apt-get download`` and unpacked
with ``dpkg -x`` into a cache: the host's own kernel and boot setup are never touched.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamos.errors import TargetError

# The one place the default lab kernel is pinned: Debian 12's stock amd64 kernel.
DEFAULT_LAB_KERNEL = "6.1.0-56-amd64"

_RELEASE_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-[a-z0-9-]+$")


def cache_root() -> Path:
    """Where dynamos keeps kernels, probes and build outputs (``$DYNAMOS_CACHE`` overrides)."""
    env = os.environ.get("DYNAMOS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynamos"


@dataclass(frozen=True)
class TargetKernel:
    """A kernel release and the files dynamos needs for it."""

    release: str
    headers_dir: Path  # Kbuild tree for out-of-tree modules (``make -C``)
    modules_dir: Path | None  # /lib/modules/<rel> of this kernel (for the lab's initramfs)
    image: Path | None  # vmlinuz (for the lab)
    config: Path | None

    @property
    def arch(self) -> str:
        return "x86_64"

    def module_path(self, name: str) -> Path:
        """Path of a kernel module file by module name (``9pnet_virtio``), searched in the tree."""
        if self.modules_dir is None:
            raise TargetError(f"no module tree known for kernel {self.release}")
        for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            for cand in (name, name.replace("_", "-")):
                hits = list((self.modules_dir / "kernel").rglob(cand + suffix))
                if hits:
                    return hits[0]
        raise TargetError(f"module {name} not found under {self.modules_dir}")


def debian_version(target: TargetKernel) -> str:
    """The Debian package version of a target kernel (e.g. ``6.1.192-2``): the version of
    ``linux-source-6.1`` that holds its exact source."""
    if target.image is not None:
        recorded = target.image.parent.parent / "debian-version"
        if recorded.exists():
            return recorded.read_text().strip()
    r = _run(["dpkg-query", "-W", "-f=${Version}", f"linux-image-{target.release}"])
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    r = _run(["apt-cache", "show", "--no-all-versions", f"linux-image-{target.release}"])
    for line in r.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise TargetError(f"cannot tell the Debian version of kernel {target.release} "
                      f"(no record in the cache, not installed, unknown to apt)")


def validate_release(release: str) -> str:
    if not _RELEASE_RE.match(release):
        raise TargetError(f"{release!r} does not look like a Debian kernel release (e.g. {DEFAULT_LAB_KERNEL})")
    return release


def host_target() -> TargetKernel:
    """The running kernel, as a build target (its installed headers)."""
    rel = platform.release()
    headers = Path(f"/lib/modules/{rel}/build")
    if not (headers / "Makefile").exists():
        # Fall back to our own cache: the same release may have been fetched for the lab.
        cached = cache_root() / "kernels" / rel
        if (cached / "ready").exists():
            return _cached_target(rel, cached)
        raise TargetError(
            f"no headers for the running kernel {rel}: install linux-headers-{rel} "
            f"or pass --kernel REL to build for a lab kernel"
        )
    # No image or config in /boot (a lab guest, a container): BTF then comes from the running
    # kernel's /sys/kernel/btf/vmlinux and the config from the headers.
    config, image = Path(f"/boot/config-{rel}"), Path(f"/boot/vmlinuz-{rel}")
    return TargetKernel(rel, headers, Path(f"/lib/modules/{rel}"), image if image.exists() else None,
                        config if config.exists() else None)


def _cached_target(release: str, root: Path) -> TargetKernel:
    return TargetKernel(
        release=release,
        headers_dir=root / "usr/src" / f"linux-headers-{release}",
        modules_dir=root / "lib/modules" / release,
        image=root / "boot" / f"vmlinuz-{release}",
        config=root / "boot" / f"config-{release}",
    )


def _packages_for(release: str) -> list[str]:
    flavour_less = release.rsplit("-", 1)[0]  # 6.1.0-56-amd64 -> 6.1.0-56
    abi = flavour_less.rsplit("-", 1)[0]  # 6.1.0
    major_minor = ".".join(abi.split(".")[:2])  # 6.1
    return [
        f"linux-image-{release}",
        f"linux-headers-{release}",
        f"linux-headers-{flavour_less}-common",
        f"linux-kbuild-{major_minor}",
    ]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_target(release: str = DEFAULT_LAB_KERNEL,
                 progress: Callable[[str], None] | None = None) -> TargetKernel:
    """Return the cached target kernel, downloading and unpacking its packages on first use."""
    validate_release(release)
    root = cache_root() / "kernels" / release
    if (root / "ready").exists():
        return _cached_target(release, root)
    say = progress or (lambda _msg: None)
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{release}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two labs fetching the same kernel wait for each other
        if (root / "ready").exists():
            return _cached_target(release, root)
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise TargetError("fetching a lab kernel needs apt-get and dpkg (Debian or a derivative)")
        packages = _packages_for(release)
        with tempfile.TemporaryDirectory(prefix="dynamos-fetch-") as tmp:
            tmpdir = Path(tmp)
            os.chmod(tmpdir, 0o755)  # let apt's sandbox user write there
            say(f"downloading {', '.join(packages)}")
            r = _run(["apt-get", "download", *packages], cwd=tmpdir)
            if r.returncode != 0:
                hint = ""
                if "Unable to locate" in r.stderr or "Can't select" in r.stderr:
                    hint = " (is the release known to apt? run 'apt-get update', check 'apt-cache policy')"
                raise TargetError(f"cannot download kernel {release}{hint}: {r.stderr.strip()[-800:]}")
            staging = root.with_name(root.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for deb in sorted(tmpdir.glob("*.deb")):
                if deb.name.startswith(f"linux-image-{release}_"):
                    # linux-image-<rel>_<debian version>_<arch>.deb: the version its source package has
                    (staging / "debian-version").write_text(deb.name.split("_")[1] + "\n")
                say(f"unpacking {deb.name}")
                r = _run(["dpkg", "-x", str(deb), str(staging)])
                if r.returncode != 0:
                    raise TargetError(f"cannot unpack {deb.name}: {r.stderr.strip()}")
        _relocate_headers(release, staging, final_root=root)
        (staging / "ready").write_text(release + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    say(f"kernel {release} cached in {root}")
    return _cached_target(release, root)


def _relocate_headers(release: str, root: Path, final_root: Path) -> None:
    """Point Debian's split headers at the cache instead of their /usr/src install location.

    ``root`` is where the packages were unpacked; ``final_root`` where they will live.
    """
    flavour_less = release.rsplit("-", 1)[0]
    headers = root / "usr/src" / f"linux-headers-{release}"
    makefile = headers / "Makefile"
    if not makefile.exists():
        raise TargetError(f"linux-headers-{release} has no Makefile; cannot build modules for it")
    text = makefile.read_text()
    common_installed = f"/usr/src/linux-headers-{flavour_less}-common"
    common_cached = str(final_root / "usr/src" / f"linux-headers-{flavour_less}-common")
    makefile.write_text(text.replace(common_installed, common_cached))
    # lib/modules/<rel>/build is an absolute symlink to /usr/src; repoint it into the cache.
    build_link = root / "lib/modules" / release / "build"
    if build_link.is_symlink():
        build_link.unlink()
        build_link.symlink_to(final_root / "usr/src" / f"linux-headers-{release}")


def resolve_target(release: str | None, progress: Callable[[str], None] | None = None) -> TargetKernel:
    """The target for ``--kernel REL`` (fetched into the cache) or, with None, the running kernel."""
    if release is None:
        return host_target()
    host_rel = platform.release()
    if release == host_rel and Path(f"/lib/modules/{release}/build/Makefile").exists():
        return host_target()
    return fetch_target(release, progress)
