"""The system lab's tests boot their own lab (a Debian root on a disk image, systemd as PID 1):
the session lab of tests/lab and its per-test check do not apply here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def kernel_left_as_found():
    """Overrides tests/lab/conftest.py's: these tests own their lab and reboot it."""
    yield
