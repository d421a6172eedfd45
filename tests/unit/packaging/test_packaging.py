"""The boot unit, the kernel hook and the Debian packages (packaging/): checked with Debian's own
tools, systemd-analyze and dpkg-deb, which every Debian 12 host has."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[3] / "packaging"
RUNTIME_FORBIDDEN = ("dynamos/builder/", "dynamos/target/", "dynamos/lab/", "dynamos/runtime/",
                     "dynamos/demo.py", "dynamos/monitor.py")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(PACKAGING / "dynamos.service")
    return parser


def test_unit_runs_load_all_early_in_boot() -> None:
    u = unit()
    assert u["Unit"]["DefaultDependencies"] == "no"
    assert "sysinit.target" in u["Unit"]["Before"].split()
    assert u["Service"]["Type"] == "oneshot" and u["Service"]["RemainAfterExit"] == "yes"
    assert u["Service"]["ExecStart"] == "/usr/bin/dynamos load --all"
    assert u["Install"]["WantedBy"] == "sysinit.target"


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """In a scratch root holding the unit and an executable /usr/bin/dynamos (as the package
    installs them), so the host's own /usr/bin and /etc are not involved."""
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/dynamos").write_text("#!/bin/sh\n")
    (tmp_path / "usr/bin/dynamos").chmod(0o755)
    units = tmp_path / "lib/systemd/system"
    units.mkdir(parents=True)
    (units / "dynamos.service").write_bytes((PACKAGING / "dynamos.service").read_bytes())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}",
                        "/lib/systemd/system/dynamos.service"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_kernel_hook_runs_gc_and_never_fails_the_removal(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    for status in (0, 1):
        fake = tmp_path / f"bin{status}"
        fake.mkdir()
        (fake / "dynamos").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit {status}\n")
        (fake / "dynamos").chmod(0o755)
        hook = str(PACKAGING / "kernel-postrm.d-dynamos")
        r = subprocess.run([hook, "6.1.0-55-amd64", "/boot/vmlinuz-6.1.0-55-amd64"],
                           env={"PATH": f"{fake}:/usr/bin:/bin"},
                           capture_output=True, text=True)
        assert r.returncode == 0
        assert ("failed" in r.stderr) == bool(status)
    assert calls.read_text().splitlines() == ["gc", "gc"]


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    paths = subprocess.run([str(PACKAGING / "build-debs"), str(out)], check=True, capture_output=True,
                           text=True).stdout.split()
    return {Path(p).name.split("_")[0]: Path(p) for p in paths}


def _contents(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    return [line.split()[5].removeprefix(".") for line in listing.splitlines()]


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True).stdout.strip()


def test_runtime_package_is_the_runtime_only(debs: dict[str, Path]) -> None:
    deb = debs["dynamos"]
    files = _contents(deb)
    for wanted in ("/usr/bin/dynamos", "/lib/systemd/system/dynamos.service", "/etc/kernel/postrm.d/dynamos",
                   "/usr/lib/python3/dist-packages/dynamos/kernel/installed.py",
                   "/usr/lib/python3/dist-packages/dynamos/cli/persist.py", "/usr/share/man/man8/dynamos.8.gz"):
        assert wanted in files
    assert [f for f in files if any(x in f for x in RUNTIME_FORBIDDEN)] == []
    assert _field(deb, "Depends") == "python3 (>= 3.11), gpgv"
    assert _field(deb, "Architecture") == "all"


def test_builder_package_carries_the_rest_and_needs_pyelftools(debs: dict[str, Path]) -> None:
    deb = debs["dynamos-builder"]
    files = _contents(deb)
    assert "/usr/lib/python3/dist-packages/dynamos/lab/init.sh" in files
    assert "/usr/lib/python3/dist-packages/dynamos/builder/kbuild.py" in files
    assert not [f for f in files if "/dynamos/kernel/" in f or f.endswith("/usr/bin/dynamos")]
    depends = _field(deb, "Depends")
    assert "python3-pyelftools (>= 0.29)" in depends and "dynamos (= " in depends


def test_the_two_packages_hold_every_source_file_once(debs: dict[str, Path]) -> None:
    src = PACKAGING.parent / "src" / "dynamos"
    wanted = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts)
    prefix = "/usr/lib/python3/dist-packages/dynamos/"
    shipped = sorted(f.removeprefix(prefix) for deb in debs.values() for f in _contents(deb)
                     if f.startswith(prefix) and not f.endswith("/"))
    assert shipped == wanted
    assert os.access(PACKAGING / "build-debs", os.X_OK)
