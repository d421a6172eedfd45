"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos.builder.signing import Signer, new_signer
from tests.support.harness import KernelHarness


@pytest.fixture
def harness(tmp_path: Path) -> KernelHarness:
    """A simulated kernel with the default scene and the production LiveKernel on it."""
    return KernelHarness(tmp_path)


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """A real signer (X.509 module key, OpenPGP package key), made once per test session."""
    return new_signer(tmp_path_factory.mktemp("signer") / "signer", "dynamos test signer")


@pytest.fixture(scope="session")
def other_signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """A second signer: trusted alongside the first, or not trusted at all (a stranger)."""
    return new_signer(tmp_path_factory.mktemp("signer") / "other", "someone else")
