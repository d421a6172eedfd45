"""The target kernel's own source, prepared once for single translation units to be compiled in it.

The source-diff builder compiles only the files a patch touches, original and patched, with the
kernel's own flags. That is only faithful when the tree is the distribution's source of the exact
target version, configured with the target's ``.config`` and built with the same compiler and the
same distribution settings (release string, package id, build user/host). So:

- ``prepare_source`` takes Debian's ``linux-source-<major.minor>`` of the target's exact Debian
  version, extracts it into ``<cache>/source/<release>/``, installs the target's config and runs
  ``make olddefconfig prepare modules_prepare`` once. The settings are read from the target's own
  headers package (``.kernelvariables``, ``include/generated/*``), and the result is checked against
  them: a config or generated header that differs from the shipped kernel's stops the preparation.
- ``dynamos.builder.units`` builds one object through Kbuild's per-object target (``make
  fs/proc/cmdline.o``), for the original file or for a replacement text of it, under the tree's
  lock and journal (here), and leaves the cached tree pristine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dynamos.errors import BuildError, TargetError
from dynamos.target.fetch import TargetKernel, cache_root, debian_version
from dynamos.target.make import MAKE_JOBS, error_lines, make_env, stream_make

# Flags every unit is compiled with (and prepare, so its objects are not made again).
DEFAULT_EXTRA_CFLAGS = ("-ffunction-sections", "-fdata-sections")
READY = "ready"  # written last: the tree is prepared and checked
EXTRACTED = "extracted"  # the tarball is fully unpacked (a failed prepare resumes from here)
JOURNAL = "restore.json"  # the original of a file compile_unit replaced, until it is put back
SETTINGS = "make-settings.json"  # make arguments and environment, shared by every make in the tree
PREPARE_LOG = "prepare.log"
# Free space an extracted and prepared 6.1 tree needs (about 1.4 GB), with a margin.
_NEEDED_BYTES = 3 * 1024**3

# Tools the prepare and single-object builds run, and the Debian package that has each.
_TOOLS = {"make": "make", "flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl", "xz": "xz-utils",
          "tar": "tar", "ld": "binutils", "as": "binutils"}
# Host headers the prepare step compiles against (objtool, sign-file).
_HOST_HEADERS = {"gelf.h": "libelf-dev", "openssl/opensslv.h": "libssl-dev"}
# Kconfig values that only record tool versions: a mismatch means another toolchain than Debian's.
_TOOL_VERSION_OPTIONS = {
    "CONFIG_GCC_VERSION": "the compiler", "CONFIG_CLANG_VERSION": "the compiler",
    "CONFIG_AS_VERSION": "binutils (as)", "CONFIG_LD_VERSION": "binutils (ld)",
    "CONFIG_PAHOLE_VERSION": "pahole (Debian package dwarves)", "CONFIG_RUSTC_VERSION": "rustc",
}
# Informational only (no code depends on them): reported, not fatal.
_TEXT_ONLY_OPTIONS = frozenset({"CONFIG_CC_VERSION_TEXT"})
# Generated headers of the target not produced by ``make prepare`` (made at vmlinux link time, or Rust).
_NOT_PREPARED = frozenset({"include/generated/utsversion.h", "include/generated/rustc_cfg"})
_UTS_FLAGS = frozenset({"SMP", "PREEMPT", "PREEMPT_DYNAMIC", "PREEMPT_RT"})

_CHECKPOINT = "dynamos-checkpoint"
_STEP_RE = re.compile(r"^\s+([A-Z][A-Z0-9_]*(?: \[M\])?)\s+(\S+)\s*$")
_DEFINE_RE = re.compile(r'^#define\s+(\w+)\s+"(.*)"\s*$', re.M)
_CONFIG_RE = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$", re.M)


@dataclass(frozen=True)
class KernelSource:
    """A target kernel's source tree, configured and prepared (``make prepare modules_prepare``)."""

    release: str
    debian_version: str
    tree: Path

    @property
    def uts_release(self) -> str:
        """``UTS_RELEASE`` the tree compiles into objects (must be the target's release)."""
        text = (self.tree / "include/generated/utsrelease.h").read_text()
        return _defines(text).get("UTS_RELEASE", "")


def source_root(release: str) -> Path:
    """Cache directory of a release's source: the tree, its markers and settings."""
    return cache_root() / "source" / release


def source_package(release: str) -> str:
    """Debian's source package for a release: ``6.1.0-56-amd64`` -> ``linux-source-6.1``."""
    major_minor = ".".join(release.split("-", 1)[0].split(".")[:2])
    return f"linux-source-{major_minor}"


def say_nothing(_message: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# prepare_source


def prepare_source(target: TargetKernel, progress: Callable[[str], None] | None = None) -> KernelSource:
    """The prepared source tree of ``target``: from the cache, or fetched and prepared now.

    A cached tree of the same release but another Debian version (Debian keeps the ABI name
    across some uploads) is prepared anew. Two preparations of one release wait for each other.
    """
    say = progress or say_nothing
    version = debian_version(target)
    root = source_root(target.release)
    package = source_package(target.release)
    source = KernelSource(target.release, version, root / package)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tree_lock(target.release, shared=True):
        if _is_ready(root, version) and not (root / JOURNAL).exists():
            return source
    with tree_lock(target.release):
        if _is_ready(root, version):
            try:
                recover(source)
                return source
            except DamagedJournal as e:
                say(f"{e}: extracting the tree anew")
                (root / EXTRACTED).unlink(missing_ok=True)
                journal_path(source).unlink()
        settings = _settings_for(target, version)
        _check_tools(settings, target)
        if (root / EXTRACTED).is_file() and (root / EXTRACTED).read_text().strip() == version:
            say(f"{package} {version} already extracted in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)  # a partial extraction, or another version's tree
            _check_space(root.parent)
            root.mkdir(parents=True)
            with source_tarball(package, version, say) as tarball:
                extract_tarball(tarball, root, say)
            if not (source.tree / "Makefile").is_file():
                raise TargetError(f"{package} {version} did not unpack into {source.tree}")
            (root / EXTRACTED).write_text(version + "\n")
        (root / READY).unlink(missing_ok=True)
        _check_version(source.tree, version, package)
        (root / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
        _configure_and_prepare(source, target, settings, say)
        (root / READY).write_text(version + "\n")
    say(f"kernel source {target.release} ({package} {version}) prepared in {source.tree}")
    return source


def _is_ready(root: Path, version: str) -> bool:
    marker = root / READY
    return marker.is_file() and marker.read_text().strip() == version


@contextmanager
def tree_lock(release: str, shared: bool = False) -> Iterator[None]:
    """Use of a release's tree: exclusive to prepare it or compile in it (a compile edits
    files), shared to read it (its markers, its cached objects) while nobody does."""
    path = cache_root() / "source" / f".{release}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def _defines(text: str) -> dict[str, str]:
    return dict(_DEFINE_RE.findall(text))


def _settings_for(target: TargetKernel, version: str) -> dict[str, object]:
    """Make variables and environment that reproduce Debian's build of this kernel.

    Read from the target's headers package, which records what Debian's build produced:
    the compiler (``.kernelvariables``), the release string, the package id printed in oopses,
    the build user/host and version stamp.
    """
    headers = target.headers_dir
    generated = headers / "include/generated"
    if not (headers / ".config").is_file():
        raise TargetError(f"the headers of {target.release} at {headers} have no .config "
                          f"(install or fetch linux-headers-{target.release})")
    cc = "gcc"
    variables = headers / ".kernelvariables"
    if variables.is_file():
        for line in variables.read_text().splitlines():
            m = re.match(r"^\s*CC\s*[:?]?=.*?((?:gcc|clang)(?:-[0-9]+)?)\s*$", line)
            if m:
                cc = m.group(1)
    make_vars = {"ARCH": "x86", "CC": cc, "KERNELRELEASE": target.release}
    env: dict[str, str] = {}
    package_h = generated / "package.h"
    if package_h.is_file():
        package_id = _defines(package_h.read_text()).get("LINUX_PACKAGE_ID", "").strip()
        if package_id:  # " Debian 6.1.192-2": Debian's DISTRIBUTION_OFFICIAL_BUILD settings
            distributor, _, dist_version = package_id.partition(" ")
            make_vars.update(DISTRIBUTION_OFFICIAL_BUILD="1", DISTRIBUTOR=distributor,
                             DISTRIBUTION_VERSION=dist_version or version)
    compile_h = generated / "compile.h"
    if compile_h.is_file():
        defines = _defines(compile_h.read_text())
        if defines.get("LINUX_COMPILE_BY"):
            env["KBUILD_BUILD_USER"] = defines["LINUX_COMPILE_BY"]
        if defines.get("LINUX_COMPILE_HOST"):
            env["KBUILD_BUILD_HOST"] = defines["LINUX_COMPILE_HOST"]
    utsversion_h = generated / "utsversion.h"
    if utsversion_h.is_file():  # "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)"
        uts = _defines(utsversion_h.read_text()).get("UTS_VERSION", "")
        words = uts.split()
        if words and words[0].startswith("#"):
            env["KBUILD_BUILD_VERSION"] = words[0][1:]
            rest = words[1:]
            while rest and rest[0] in _UTS_FLAGS:
                rest = rest[1:]
            if rest:
                env["KBUILD_BUILD_VERSION_TIMESTAMP"] = " ".join(rest)
    return {"make_vars": make_vars, "env": env, "compiler": cc}


def _check_tools(settings: dict[str, object], target: TargetKernel) -> None:
    """Refuse early, naming the Debian packages to install, when a build tool is missing."""
    cc = str(settings["compiler"])
    missing: dict[str, str] = {}
    if shutil.which(cc) is None:
        missing[cc] = cc if cc != "gcc" else "gcc"
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            missing[tool] = package
    config = read_config(target.headers_dir / ".config")
    if config.get("CONFIG_PAHOLE_VERSION", "0") not in ("0", "") and shutil.which("pahole") is None:
        missing["pahole"] = "dwarves"
    for header, package in _HOST_HEADERS.items():
        if not Path("/usr/include", header).is_file():
            missing[header] = package
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise BuildError(f"preparing the source of {target.release} needs {', '.join(sorted(missing))}, "
                         f"which the target's kernel was built with and this machine lacks "
                         f"(on Debian: apt-get install {packages})")


def _check_space(where: Path) -> None:
    free = shutil.disk_usage(where).free
    if free < _NEEDED_BYTES:
        raise TargetError(f"not enough disk space for a kernel source tree in {where}: "
                          f"{free / 1024**3:.1f} GB free, about {_NEEDED_BYTES / 1024**3:.0f} GB needed")


class _Tarball:
    """The source tarball, from wherever it is cheapest; a context manager that cleans up."""

    def __init__(self, path: Path, tmp: tempfile.TemporaryDirectory[str] | None = None):
        self.path = path
        self._tmp = tmp

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def source_tarball(package: str, version: str, say: Callable[[str], None]) -> _Tarball:
    """``usr/src/<package>.tar.xz`` of the source package of exactly ``version``.

    In order: the installed package (when dpkg has that version and the file checks against
    dpkg's md5sum), the .deb kept in ``<cache>/debs``, or ``apt-get download`` (kept for next time).
    """
    member = f"usr/src/{package}.tar.xz"
    say(f"looking for {package} {version}")
    installed = _installed_tarball(package, version, member)
    if installed is not None:
        say(f"using the installed {package} {version} ({installed})")
        return _Tarball(installed)
    debs = cache_root() / "debs"
    deb = debs / f"{package}_{version.replace(':', '%3a')}_all.deb"
    if deb.is_file():
        say(f"source package present: {deb}")
    else:
        _download(package, version, deb, say)
    tmp = tempfile.TemporaryDirectory(prefix="dynamos-source-", dir=cache_root())
    say(f"unpacking {deb.name}")
    r = subprocess.run(["dpkg", "-x", str(deb), tmp.name], capture_output=True, text=True)
    tarball = Path(tmp.name) / member
    if r.returncode != 0 or not tarball.is_file():
        tmp.cleanup()
        deb.unlink(missing_ok=True)  # corrupt: fetch it again next time
        raise TargetError(f"cannot unpack {deb.name}: {(r.stderr.strip() or f'no {member} inside')[-500:]}")
    return _Tarball(tarball, tmp)


def _installed_tarball(package: str, version: str, member: str) -> Path | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version} ${db:Status-Status}", package],
                       capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != f"{version} installed":
        return None
    path = Path("/") / member
    sums = Path(f"/var/lib/dpkg/info/{package}.md5sums")
    if not path.is_file() or not sums.is_file():
        return None
    expected = next((line.split()[0] for line in sums.read_text().splitlines()
                     if line.split()[-1:] == [member]), None)
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return path if digest.hexdigest() == expected else None


def _download(package: str, version: str, deb: Path, say: Callable[[str], None]) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise TargetError(f"fetching {package} {version} needs apt-get and dpkg (Debian or a derivative)")
    show = subprocess.run(["apt-cache", "show", "--no-all-versions", f"{package}={version}"],
                          capture_output=True, text=True)
    if show.returncode != 0 or not show.stdout.strip():
        madison = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True)
        known = list(dict.fromkeys(line.split("|")[1].strip() for line in madison.stdout.splitlines() if "|" in line))
        known_text = f"apt knows {', '.join(known)}" if known else f"apt knows no {package} at all"
        raise TargetError(
            f"the kernel's exact source, {package} version {version}, is not available from apt "
            f"({known_text}); add an archive that has it (the security suite, or Debian's snapshot "
            f"archive for old versions) to the apt sources and run 'apt-get update'")
    size = next((int(line.split()[1]) for line in show.stdout.splitlines() if line.startswith("Size:")), 0)
    say(f"downloading {package} {version} ({size / 1e6:.0f} MB)")
    deb.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dynamos-fetch-", dir=deb.parent) as tmp:
        os.chmod(tmp, 0o755)  # let apt's sandbox user write there
        r = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        got = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if r.returncode != 0 or not got:
            raise TargetError(f"cannot download {package} {version}: {r.stderr.strip()[-800:]}")
        got[0].rename(deb)


def extract_tarball(tarball: Path, root: Path, say: Callable[[str], None]) -> None:
    """``tar -xf`` (the fastest extractor here), with a percentage from tar's checkpoints."""
    total = 0
    listing = subprocess.run(["xz", "--robot", "--list", str(tarball)], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        if line.startswith("totals\t"):
            total = int(line.split("\t")[4])
    records = 10000  # a checkpoint every 10000 records of 10 KiB: about 100 MB
    cmd = ["tar", "-xf", str(tarball), "-C", str(root), "--no-same-owner",
           f"--checkpoint={records}", f"--checkpoint-action=echo={_CHECKPOINT} %u"]
    say(f"extracting {tarball.name} ({total / 1e9:.1f} GB)" if total else f"extracting {tarball.name}")
    errors: list[str] = []
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                          text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            head, _, count = line.rpartition(_CHECKPOINT)
            if not head.endswith(": ") or not count.strip().isdigit():
                errors.append(line.rstrip())
                continue
            done = int(count) * 10240  # %u is the number of records read so far
            say(f"extracting {tarball.name}: {min(99, 100 * done // total)}%" if total
                else f"extracting {tarball.name}: {done // 10**6} MB")
    status = proc.wait()
    if status != 0:
        raise TargetError(f"cannot extract {tarball}: {' '.join(errors)[-800:]}")


def _check_version(tree: Path, version: str, package: str) -> None:
    """The tree's Makefile must be of the upstream version in the Debian version (6.1.192-2 -> 6.1.192)."""
    text = (tree / "Makefile").read_text(errors="replace")
    parts = {k: re.search(rf"^{k}\s*=\s*(\S*)", text, re.M) for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")}
    found = ".".join(m.group(1) if m else "?" for m in parts.values())
    upstream = version.split(":")[-1].split("-")[0]
    if found != upstream:
        raise TargetError(f"{package} {version} unpacked a kernel {found}, not {upstream}")


def make_command(tree: Path, settings: dict[str, object], *goals: str, jobs: int = MAKE_JOBS) -> list[str]:
    make_vars = settings["make_vars"]
    assert isinstance(make_vars, dict)
    return ["make", "-C", str(tree), f"-j{jobs}", *(f"{k}={v}" for k, v in make_vars.items()), *goals]


def run_make(cmd: list[str], settings: dict[str, object], say: Callable[[str], None],
              label: str) -> tuple[int, str]:
    """Run make, reporting each Kbuild step (``CC fs/proc/cmdline.o``); returns status and log."""
    extra = settings.get("env", {})
    assert isinstance(extra, dict)

    def step(line: str) -> None:
        m = _STEP_RE.match(line)
        if m:
            say(f"{label}: {m.group(1)} {m.group(2)}")

    return stream_make(cmd, make_env(extra=extra), step)


def with_cflags(settings: dict[str, object], cflags: Sequence[str]) -> dict[str, object]:
    """Settings whose make command adds ``cflags`` to the kernel's own (``KCFLAGS``)."""
    make_vars = dict(settings["make_vars"])  # type: ignore[call-overload]
    if cflags:
        make_vars["KCFLAGS"] = " ".join(cflags)
    return {**settings, "make_vars": make_vars}


def _configure_and_prepare(source: KernelSource, target: TargetKernel, settings: dict[str, object],
                           say: Callable[[str], None]) -> None:
    tree = source.tree
    root = tree.parent
    shutil.copyfile(target.headers_dir / ".config", tree / ".config")
    log_parts: list[str] = []
    # The objects prepare compiles (bounds.s, asm-offsets.s) record their flags: made with the flags
    # compile_unit uses by default, they are not made again on its first call.
    with_flags = with_cflags(settings, DEFAULT_EXTRA_CFLAGS)
    for label, goals in (("configuring", ("olddefconfig",)), ("preparing", ("prepare", "modules_prepare"))):
        say(f"{label} {tree.name} for {target.release}")
        status, log = run_make(make_command(tree, with_flags, *goals), with_flags, say, label)
        log_parts.append(log)
        (root / PREPARE_LOG).write_text("".join(log_parts))
        if status != 0:
            errors = error_lines(log) or [line for line in log.splitlines() if line.strip()][-15:]
            raise BuildError(f"'make {' '.join(goals)}' failed in {tree} for {target.release}:\n"
                             + "\n".join(errors) + f"\nfull log: {root / PREPARE_LOG}")
        if goals == ("olddefconfig",):
            _compare_config(target.headers_dir / ".config", tree / ".config", target.release, say)
    _compare_generated(target, tree, say)
    if source.uts_release != target.release:
        raise TargetError(f"the prepared tree compiles UTS_RELEASE {source.uts_release!r}, "
                          f"not the target's {target.release!r}")


def read_config(path: Path) -> dict[str, str]:
    """A kernel .config as {CONFIG_X: value}; options "is not set" read as "n"."""
    values: dict[str, str] = {}
    for m in _CONFIG_RE.finditer(path.read_text(errors="replace")):
        if m.group(1):
            values[m.group(1)] = m.group(2)
        else:
            values[m.group(3)] = "n"
    return values


def _compare_config(shipped: Path, ours: Path, release: str, say: Callable[[str], None]) -> None:
    """``olddefconfig`` must keep the target's config as is; a change means another toolchain."""
    want, got = read_config(shipped), read_config(ours)
    changed = sorted(k for k in set(want) | set(got) if want.get(k, "n") != got.get(k, "n"))
    for key in [k for k in changed if k in _TEXT_ONLY_OPTIONS]:
        say(f"warning: {key} is {got.get(key)} here, {want.get(key)} in {release}'s build")
    changed = [k for k in changed if k not in _TEXT_ONLY_OPTIONS]
    if not changed:
        return
    shown = [f"{k}: {want.get(k, 'n')} -> {got.get(k, 'n')}" for k in changed[:20]]
    hints = sorted({f"{_TOOL_VERSION_OPTIONS[k]} differs from the one {release} was built with"
                    for k in changed if k in _TOOL_VERSION_OPTIONS})
    raise TargetError(f"the kernel source configured with {release}'s config does not keep it "
                      f"({len(changed)} option(s) changed):\n  " + "\n  ".join(shown)
                      + "".join(f"\nhint: {h}" for h in hints))


def _compare_generated(target: TargetKernel, tree: Path, say: Callable[[str], None]) -> None:
    """Every generated header the target's headers ship must come out identical from our prepare."""
    headers = target.headers_dir
    differing: list[str] = []
    for base in ("include/generated", "arch/x86/include/generated"):
        for shipped in sorted((headers / base).rglob("*")):
            rel = shipped.relative_to(headers).as_posix()
            if not shipped.is_file() or rel in _NOT_PREPARED:
                continue
            ours = tree / rel
            if not ours.is_file():
                differing.append(f"{rel} (not generated here)")
            elif ours.read_bytes() != shipped.read_bytes():
                if rel == "include/generated/compile.h" and _only_compiler_text(shipped, ours):
                    say(f"warning: {rel}: another build of the same compiler than {target.release}'s")
                    continue
                differing.append(f"{rel}: {_first_difference(shipped, ours)}")
    if differing:
        raise TargetError(f"the prepared source of {target.release} differs from its shipped headers:\n  "
                          + "\n  ".join(differing[:20]))


def _only_compiler_text(shipped: Path, ours: Path) -> bool:
    a, b = _defines(shipped.read_text()), _defines(ours.read_text())
    a.pop("LINUX_COMPILER", None)
    b.pop("LINUX_COMPILER", None)
    return a == b


def _first_difference(shipped: Path, ours: Path) -> str:
    a = shipped.read_text(errors="replace").splitlines()
    b = ours.read_text(errors="replace").splitlines()
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"shipped {x.strip()!r}, here {y.strip()!r}"
    return f"shipped {len(a)} lines, here {len(b)}"


# --------------------------------------------------------------------------------------------------
# compile_unit


def load_settings(source: KernelSource) -> dict[str, object]:
    root = source.tree.parent
    if not _is_ready(root, source.debian_version):
        raise BuildError(f"the source tree of {source.release} at {source.tree} is not prepared "
                         f"(run prepare_source first)")
    settings = json.loads((root / SETTINGS).read_text())
    assert isinstance(settings, dict)
    return settings


def journal_path(source: KernelSource) -> Path:
    return source.tree.parent / JOURNAL


class DamagedJournal(TargetError):
    """The journal of a compile cannot be read back: the files it names may be left patched."""


def write_journal(source: KernelSource, obj_rel: str, originals: Mapping[str, tuple[bytes, os.stat_result]]) -> None:
    """Record files' original contents before replacing them, for recover after a hard kill.
    Written whole and synced before it replaces the old one: a crash leaves either journal."""
    record = {"object": obj_rel,
              "files": [{"path": rel, "atime_ns": stat.st_atime_ns, "mtime_ns": stat.st_mtime_ns,
                         "content": content.hex(), "sha256": hashlib.sha256(content).hexdigest()}
                        for rel, (content, stat) in originals.items()]}
    tmp = journal_path(source).with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, journal_path(source))
    directory = os.open(tmp.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _tree_file(source: KernelSource, rel: object) -> Path:
    """A journal's path, checked to name a regular file inside the tree."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"path {rel!r} is not inside the tree")
    path = source.tree / rel
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{rel} is not a regular file of the tree")
    return path


def _journal_entries(source: KernelSource, journal: Path) -> tuple[Path, list[tuple[Path, bytes, int, int]]]:
    """The object and (file, original content, atime, mtime) a journal records; DamagedJournal
    when any of it is missing, malformed, points outside the tree or fails its digest."""
    try:
        record = json.loads(journal.read_text())
        entries = []
        for f in record["files"]:
            content = bytes.fromhex(f["content"])
            if hashlib.sha256(content).hexdigest() != f["sha256"]:
                raise ValueError(f"the saved content of {f['path']} fails its digest")
            entries.append((_tree_file(source, f["path"]), content, int(f["atime_ns"]), int(f["mtime_ns"])))
        obj = record["object"]
        if not isinstance(obj, str) or Path(obj).is_absolute() or ".." in Path(obj).parts or not obj.endswith(".o"):
            raise ValueError(f"object {obj!r} is not inside the tree")
        return source.tree / obj, entries
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedJournal(f"the compile journal {journal} of {source.release}'s tree is damaged ({e})") from None


def recover(source: KernelSource) -> None:
    """Put back files a killed compile_unit left patched (its finally never ran). Every entry is
    checked before any file is written: a damaged journal changes nothing and says so."""
    journal = journal_path(source)
    if not journal.is_file():
        return
    obj, entries = _journal_entries(source, journal)
    for path, content, atime, mtime in entries:
        path.write_bytes(content)
        os.utime(path, ns=(atime, mtime))
    remove_object(obj)
    journal.unlink()


def remove_object(obj_path: Path) -> None:
    """Forget a built object: the file and Kbuild's record of how it was built (``.x.o.cmd``)."""
    for path in (obj_path, obj_path.with_name(f".{obj_path.name}.cmd"), obj_path.with_name(f".{obj_path.name}.d")):
        path.unlink(missing_ok=True)
