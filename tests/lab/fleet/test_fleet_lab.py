"""Rolling updates out to three labs with ansible-playbook: canary first, waves, health checks,
rollback, check mode (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.conftest import LAB_MODULES, LAB_UPDATES
from tests.lab.fleet.conftest import inventory

pytestmark = pytest.mark.lab

# The bad update's edition WARNs each time /proc/loadavg is read; the health command reads it.
BAD_WARNING = "loadavg_proc_show_fleet_bad"
HEALTH = {"dynamos_health_command": "cat /proc/loadavg", "dynamos_lab_expect_warning": BAD_WARNING}


def test_rollout_canary_first_then_waves_and_second_run_changes_nothing(fleet, fleet_package, playbook):
    good = fleet_package("fleet-good")
    inv = inventory(fleet, {"dynamos_packages": [str(good)], **HEALTH})
    first = playbook(inv)
    assert first.status == 0, first.output
    applied = {}
    for host in fleet:
        updates = host.updates()
        assert list(updates) == ["fleet_good"], (host.name, updates)
        assert updates["fleet_good"]["enabled"] and not updates["fleet_good"]["transition"]
        assert host.loadavg().endswith("fleet-good")
        applied[host.name] = updates["fleet_good"]["applied"]
    canary, *rest = fleet
    # The canary got it and passed its check before any other host was touched.
    assert all(applied[canary.name] < applied[h.name] for h in rest), applied
    assert first.output.index(f"ok: [{canary.name}]") < first.output.index("PLAY [Waves]")
    assert all(first.recap()[h.name]["changed"] == 1 for h in fleet), first.recap()

    second = playbook(inv)
    assert second.status == 0, second.output
    assert all(second.recap()[h.name]["changed"] == 0 for h in fleet), second.recap()
    assert {h.name: h.updates()["fleet_good"]["applied"] for h in fleet} == applied


def test_bad_update_on_canary_is_rolled_back_and_nothing_else_is_touched(fleet, fleet_package, playbook):
    bad = fleet_package("fleet-bad")
    canary, *rest = fleet
    before = {h.name: (h.action_log(), h.guest.modules()) for h in rest}
    console_before = {h.name: len(h.console()) for h in fleet}
    result = playbook(inventory(fleet, {"dynamos_packages": [str(bad)], **HEALTH}))
    assert result.status != 0, result.output
    assert "dynamos rollout stopped" in result.output
    assert f"{canary.name}: Check the host's health since the apply: health check failed" in result.output
    assert "WARNING: CPU:" in result.output  # the reason: the kernel log's warning
    assert "PLAY [Waves]" not in result.output
    # The canary had it, warned, and was rolled back.
    assert canary.updates() == {}
    assert "fleet_bad" not in canary.guest.modules()
    log = canary.action_log()
    assert '"apply"' in log and '"revert"' in log and "fleet_bad" in log
    assert BAD_WARNING in canary.console()[console_before[canary.name]:]
    # The other two were never touched.
    for host in rest:
        assert (host.action_log(), host.guest.modules()) == before[host.name], host.name
        assert BAD_WARNING not in host.console()[console_before[host.name]:]


def test_failure_in_a_later_wave_rolls_back_that_wave_only(fleet, fleet_package, playbook):
    good, bad = fleet_package("fleet-good"), fleet_package("fleet-bad")
    canary, second, third = fleet
    inv = inventory(fleet, {"dynamos_packages": [str(good)], **HEALTH},
                    host_vars={third.name: {"dynamos_packages": [str(bad)]}})
    result = playbook(inv, "-e", "wave_size=2")  # the two others form one wave
    assert result.status != 0, result.output
    assert f"{third.name}: Check the host's health since the apply: health check failed" in result.output
    assert list(canary.updates()) == ["fleet_good"]  # the earlier, healthy wave keeps it
    assert canary.loadavg().endswith("fleet-good")
    for host in (second, third):  # the failed wave: both rolled back
        assert host.updates() == {}, host.name
        assert '"revert"' in host.action_log(), host.name
    assert "Roll back this host, its wave failed" in result.output


@pytest.fixture(scope="session")
def stall_module(target, workdir) -> str:
    """The dynamos_stall test module (a kthread that never leaves dynamos_stall_loop)."""
    out = workdir / "fleet-stall-module"
    if not (out / "dynamos_stall.ko").exists():
        subprocess.run(["cp", "-r", str(LAB_MODULES / "dynamos_stall"), str(out)], check=True)
        subprocess.run(["make", "-s", "-C", str(target.headers_dir), f"M={out}", "modules"], check=True,
                       capture_output=True)
    return str(out / "dynamos_stall.ko")


def test_check_mode_reports_the_blocker_and_changes_nothing(fleet, build, stall_module, playbook):
    canary = fleet[0]
    pkg = build(LAB_UPDATES / "stall-breaker")
    canary.guest.load_module(stall_module)
    try:
        log_before = canary.action_log()
        result = playbook(inventory(fleet, {"dynamos_packages": [str(pkg)]}), "--check", "--diff",
                          "-l", canary.name, "-v")
        assert result.status == 0, result.output
        assert "would block the transition now: dynamos-stall" in result.output
        assert "dynamos_stall_loop" in result.output
        assert "+stall-breaker (stall_breaker) enabled " in result.output  # --diff: the update it would add
        assert canary.updates() == {}
        assert "stall_breaker" not in canary.guest.modules()
        assert canary.action_log() == log_before
    finally:
        canary.guest.unload_module("dynamos_stall")


def test_modules_install_switch_facts_uninstall_idempotently(fleet, build, playbook, target):
    canary = fleet[0]
    pkg = build(LAB_UPDATES / "pipe-editions")
    inv = inventory(fleet, {"editions_package": str(pkg), "dynamos_release": target.release})
    result = playbook(inv, "-l", canary.name, playbook=Path(__file__).parent / "playbooks" / "modules.yml")
    assert result.status == 0, result.output
    assert result.recap()[canary.name]["failed"] == 0
    assert canary.updates() == {}
    assert "pipe-editions" not in canary.guest.sh(f"{sys.executable} -m dynamos installed; true")
