"""What every test directory shares: the one target-kernel fixture, and the markers that split the suite.

- ``lab``: boots the real target kernel in QEMU (``tests/lab``); never skipped in CI.
- ``kbuild``: downloads the target's Debian packages or runs Kbuild against them. Any test that
  uses the ``target`` fixture gets it, so the fast suite ``pytest -m "not lab and not kbuild"``
  needs neither a kernel nor a build tree.
"""

from __future__ import annotations

import pytest

from dynamos.target import DEFAULT_LAB_KERNEL, TargetKernel, fetch_target


@pytest.fixture(scope="session")
def target() -> TargetKernel:
    """The default lab kernel's packages, fetched into the cache on first use."""
    return fetch_target(DEFAULT_LAB_KERNEL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "target" in getattr(item, "fixturenames", ()) and item.get_closest_marker("lab") is None:
            item.add_marker(pytest.mark.kbuild)
