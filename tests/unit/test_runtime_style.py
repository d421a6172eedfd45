"""The runtime C reads like kernel code: the kernel's own checkpatch.pl, from the target's prepared
source tree, finds nothing in any file dynamos compiles into update modules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dynamos.target.source import KernelSource, prepare_source

RUNTIME = Path(__file__).resolve().parents[2] / "src" / "dynamos" / "runtime"


@pytest.fixture(scope="module")
def source(target) -> KernelSource:
    return prepare_source(target)


@pytest.mark.parametrize("name", sorted(p.name for p in RUNTIME.iterdir() if p.suffix in (".c", ".h")))
def test_checkpatch_finds_nothing(source: KernelSource, name: str) -> None:
    checkpatch = source.tree / "scripts" / "checkpatch.pl"
    r = subprocess.run(["perl", str(checkpatch), "--no-tree", "--strict", "-f", str(RUNTIME / name)],
                       capture_output=True, text=True, timeout=120)
    assert "total: 0 errors, 0 warnings, 0 checks" in r.stdout, r.stdout[-3000:]
