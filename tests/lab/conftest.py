"""Lab tests: the real Debian kernel booted in QEMU, one lab shared by the whole session.

Every test leaves the guest kernel as it found it (no livepatch, no test module loaded, no oops):
the autouse fixture checks that after each test.  These tests are never skipped: a machine that
cannot boot the lab fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamos.builder.kbuild import build_update
from dynamos.demo import guest_env
from dynamos.lab import Lab, LabConfig
from dynamos.lab.vm import labs_dir
from dynamos.target import cache_root
from dynamos.target.images import extract_vmlinux

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LAB_UPDATES = Path(__file__).resolve().parent / "updates"
LAB_MODULES = Path(__file__).resolve().parent / "modules"


@dataclass
class Guest:
    """Runs commands in the session's lab and fails loudly on kernel trouble."""

    lab: Lab

    def run(self, *argv: str, timeout: float = 120, check: bool = True):
        r = self.lab.run(list(argv), timeout=timeout, env=guest_env())
        assert not r.kernel_messages, f"guest kernel trouble during {argv}: {r.kernel_messages}"
        if check:
            assert r.status == 0, f"{argv} exited {r.status}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
        return r

    def sh(self, script: str, **kw) -> str:
        return self.run("sh", "-c", script, **kw).stdout.decode()

    def dynamos(self, *args: str, check: bool = True, timeout: float = 180):
        return self.run(sys.executable, "-m", "dynamos", *args, check=check, timeout=timeout)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout.decode()

    def livepatches(self) -> list[str]:
        return self.sh("ls /sys/kernel/livepatch").split()

    def modules(self) -> set[str]:
        return {line.split()[0] for line in self.read("/proc/modules").splitlines()}

    def revert_leftovers(self) -> list[str]:
        """Revert every live update still loaded, so that one failed test does not fail all later
        ones; the names it found, for the failing test's message."""
        left = self.livepatches()
        for name in reversed(left):
            self.lab.run([sys.executable, "-m", "dynamos", "revert", name], timeout=180, env=guest_env())
        return left

    def status(self) -> dict:
        return json.loads(self.dynamos("status", "--json").stdout)

    def load_module(self, path: str) -> None:
        """Load a plain kernel module (a test module, or one of the lab kernel's own)."""
        self.run(sys.executable, "-c", "import sys; from dynamos.kernel import LibcSyscalls; "
                 "LibcSyscalls().init_module(open(sys.argv[1], 'rb').read())", path)

    def unload_module(self, name: str) -> None:
        self.run(sys.executable, "-c", "import sys; from dynamos.kernel import LibcSyscalls; "
                 "LibcSyscalls().delete_module(sys.argv[1])", name)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """Host directory for packages and sources: the one the guest may write, at the same path."""
    return tmp_path_factory.mktemp("lab")


def lab_config(target, workdir: Path, **kw) -> LabConfig:
    """What a test lab sees: the checkout and the cache read-only; writable only the test's
    working directory and the build directory of the cache (the guest builds monitoring updates)."""
    builds = cache_root() / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    return LabConfig(kernel=target.release, shares=[str(REPO), str(cache_root())],
                     outputs=[str(workdir), str(builds)], **kw)


@pytest.fixture(scope="session")
def lab(target, workdir):
    state_dir = labs_dir() / f"pytest-{Path(workdir).name}-{id(workdir)}"
    lab = Lab.boot(lab_config(target, workdir), state_dir=state_dir,
                   progress=lambda m: print(f"lab: {m}", file=sys.stderr))
    yield lab
    lab.kill()
    lab.discard()


@pytest.fixture(scope="session")
def guest(lab) -> Guest:
    return Guest(lab)


@contextmanager
def uniprocessor_guest(target, workdir: Path, name: str, cpus: int = 1,
                       tcg_threads: str = "multi") -> Iterator[Guest]:
    """A lab of its own for tests that two multi-threaded TCG vCPUs make flaky: one vCPU, or two
    that QEMU runs on one host thread (``tcg_threads="single"``), still two CPUs to the guest.

    With two vCPUs on this two-core host, QEMU's vCPU threads and its I/O thread compete for the
    cores: a thread calling livepatched module functions in a tight loop, and a memory hog
    faulting in pages under reclaim, each intermittently stalled on a vCPU for tens of seconds,
    which the guest reports as a soft lockup. ``bench/bench_two_vcpu_stalls.py`` shows it is
    QEMU's multi-threaded TCG: the same guest work hangs there (the thread stuck at the patched
    function's ftrace site, RCU stall) and never with the two vCPUs on one host thread.
    """
    state_dir = labs_dir() / f"pytest-{name}-{Path(workdir).name}"
    lab = Lab.boot(lab_config(target, workdir, cpus=cpus, tcg_threads=tcg_threads), state_dir=state_dir,
                   progress=lambda m: print(f"lab {name}: {m}", file=sys.stderr))
    try:
        yield Guest(lab)
    finally:
        lab.kill()
        lab.discard()


@pytest.fixture(autouse=True)
def kernel_left_as_found(guest):
    """Each test starts and must end with no live update and no test module in the guest."""
    before = guest.modules()
    assert guest.revert_leftovers() == [], "a previous test left a live update behind"
    yield
    assert guest.revert_leftovers() == [], "the test left a live update behind"
    assert guest.modules() == before, "the test left modules loaded or unloaded"


@pytest.fixture(scope="session")
def build(target, workdir):
    """Build an update source (a dir, or a dict of files to write) into a package on the host."""
    built: dict[str, Path] = {}

    def _build(source: Path | dict[str, str], name: str | None = None, module_dirs: tuple[Path, ...] = ()) -> Path:
        if isinstance(source, dict):
            assert name, "a generated source needs a name"
            src = workdir / "src" / name
            src.mkdir(parents=True, exist_ok=True)
            for fname, text in source.items():
                (src / fname).write_text(text)
        else:
            src = source
        key = str(src)
        if key not in built:
            out = workdir / "packages"
            out.mkdir(exist_ok=True)
            built[key] = build_update(src, target, output=out, module_dirs=module_dirs).package_path
        return built[key]

    return _build


def build_test_module(target, workdir: Path, name: str) -> tuple[str, Path]:
    """Build the test module ``name`` (tests/lab/modules) for the lab kernel: its .ko, and a
    directory holding a copy of it with BTF.

    Out-of-tree modules get no BTF from Debian's headers (Kbuild needs vmlinux for that), so
    pahole writes it into a copy that only the build reads; the module loaded stays as built.
    """
    out = workdir / f"{name}-module"
    if not (out / f"{name}.ko").is_file():
        shutil.copytree(LAB_MODULES / name, out, dirs_exist_ok=True)
        subprocess.run(["make", "-s", "-C", str(target.headers_dir), f"M={out}", "modules"], check=True,
                       capture_output=True)
    btf_dir = workdir / f"{name}-btf"
    if not (btf_dir / f"{name}.ko").is_file():
        btf_dir.mkdir(exist_ok=True)
        shutil.copy(out / f"{name}.ko", btf_dir)
        subprocess.run(["pahole", "-J", "--btf_base", str(extract_vmlinux(target)), str(btf_dir / f"{name}.ko")],
                       check=True, capture_output=True, env={**os.environ, "LLVM_OBJCOPY": "objcopy"})
    return str(out / f"{name}.ko"), btf_dir
