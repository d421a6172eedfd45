"""The journal on the real kernel: an apply killed with SIGKILL once its livepatch appears is
reported as interrupted by status, and recover leaves the kernel updated and recorded, or
reverted, and says which."""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import EXAMPLES

pytestmark = pytest.mark.lab


def test_killed_apply_is_reported_and_recovered(guest, build):
    pkg = build(EXAMPLES / "cmdline-banner")
    original = guest.read("/proc/cmdline")
    out = guest.sh(
        f"{sys.executable} -m dynamos apply {pkg} >/tmp/killed-apply.out 2>&1 & pid=$!\n"
        "i=0; while [ ! -d /sys/kernel/livepatch/cmdline_banner ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n"
        "kill -9 $pid; wait $pid; echo \"exit $?\"; ls /sys/kernel/livepatch\n", timeout=240)
    assert "exit 137" in out and "cmdline_banner" in out, out  # killed, with the livepatch loaded

    status = guest.status()
    (op,) = [o for o in status.get("interrupted", []) if o["update"] == "cmdline_banner"]
    assert op["action"] == "apply" and op["in_progress"] is False
    assert op["kernel"].startswith("livepatch cmdline_banner is loaded, enabled"), op
    text = guest.dynamos("status").stdout.decode()
    assert "interrupted: apply of cmdline_banner" in text, text

    recovered = json.loads(guest.dynamos("recover", "--json").stdout)
    (item,) = [i for i in recovered["recovered"] if i["name"] == "cmdline_banner"]
    assert item["outcome"] in ("completed", "reverted and unloaded"), item
    print(f"recover said: {item['outcome']}: {item['detail']}", file=sys.stderr)
    after = guest.status()
    assert "interrupted" not in after
    if item["outcome"] == "completed":
        (update,) = after["updates"]
        assert update["name"] == "cmdline_banner" and update["enabled"] and not update["transition"]
        assert update["dynamos"] is True
        assert guest.read("/proc/cmdline").startswith("[live-updated by dynamos]")
        guest.dynamos("revert", "cmdline-banner")
    else:
        assert guest.livepatches() == [] and "cmdline_banner" not in guest.modules()
    assert guest.read("/proc/cmdline") == original
    assert "nothing to recover" in guest.dynamos("recover").stdout.decode()
