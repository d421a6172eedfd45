"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import KernelHarness


@pytest.fixture
def harness(tmp_path: Path) -> KernelHarness:
    """A simulated kernel with the default scene and the production LiveKernel on it."""
    return KernelHarness(tmp_path)
