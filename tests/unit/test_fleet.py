"""Pure logic of the fleet collection (ansible_collections/dynamos/kernel): the package chosen per
kernel release, dynamos' JSON read back, the lab connection's guest commands, the health check's
log window, expected lab warnings; and that the collection builds and installs with ansible-galaxy."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dynamos.lab.vm import split_expected

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible_collections" / "dynamos" / "kernel"


def load(relative: str):
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_")[:-3], COLLECTION / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


utils = load("plugins/module_utils/dynamos.py")


def test_package_for_the_hosts_release_from_a_mapping_or_a_list():
    by_release = {"6.1.0-56-amd64": "a.dynpkg", "6.1.0-55-amd64": "b.dynpkg"}
    assert utils.pick_package(by_release, "6.1.0-55-amd64") == "b.dynpkg"
    packages = ["out/fix_6.1.0-56-amd64.dynpkg", "out/fix_6.1.0-55-amd64.dynpkg"]
    assert utils.pick_package(packages, "6.1.0-56-amd64") == "out/fix_6.1.0-56-amd64.dynpkg"
    assert utils.pick_package("one.dynpkg", "anything") == "one.dynpkg"  # dynamos refuses a wrong release itself


@pytest.mark.parametrize("packages, message", [
    ({"6.1.0-56-amd64": "a"}, "no package for kernel 6.1.0-99-amd64 (packages for: 6.1.0-56-amd64)"),
    (["fix_6.1.0-56-amd64.dynpkg"], "no package for kernel 6.1.0-99-amd64 (packages for: 6.1.0-56-amd64)"),
    (["a/fix_6.1.0-99-amd64.dynpkg", "b/fix_6.1.0-99-amd64.dynpkg"], "more than one package for kernel 6.1.0-99"),
    (42, "packages must be a path, a list of paths or a mapping"),
])
def test_no_or_ambiguous_package_is_named(packages, message):
    with pytest.raises(utils.PackageChoiceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        utils.pick_package(packages, "6.1.0-99-amd64")


def test_release_read_from_the_package_file_name():
    assert utils.package_release("/x/cmdline-banner_6.1.0-56-amd64.dynpkg") == "6.1.0-56-amd64"
    assert utils.package_release("/x/whatever.dynpkg") is None


def test_dynamos_json_is_read_back_and_a_crash_becomes_a_failure_object():
    ok = utils.parse_output('{"ok": true, "name": "x"}\n', "", 0)
    assert ok == {"ok": True, "name": "x", "exit_status": 0}
    refused = utils.parse_output('{"ok": false, "exit_status": 3, "error": "unsigned", "refusals": []}', "", 3)
    assert refused["error"] == "unsigned" and refused["exit_status"] == 3
    crashed = utils.parse_output("", "Traceback...\nModuleNotFoundError: No module named 'dynamos'\n", 1)
    assert crashed == {"ok": False, "exit_status": 1, "error": "ModuleNotFoundError: No module named 'dynamos'",
                       "refusals": []}


def test_update_summary_for_diff_mode():
    status = {"updates": [{"name": "fix_x", "update": "fix-x", "enabled": True, "transition": True,
                           "module_sha256": "ab" * 32}]}
    assert utils.update_summary(status) == [f"fix-x (fix_x) enabled, in transition {'ab' * 8}\n"]


def test_lab_connection_writes_and_reads_files_with_guest_commands(tmp_path):
    """put_file's and fetch_file's guest commands, run here: a path with spaces and quotes survives,
    and the bytes come back unchanged."""
    lab = load("plugins/connection/lab.py")
    target = tmp_path / "dir with 'quotes' and spaces" / "pkg.dynpkg"
    target.parent.mkdir()
    data = bytes(range(256)) * 100
    subprocess.run(lab.put_argv(str(target)), input=data, check=True)
    assert target.read_bytes() == data
    assert subprocess.run(lab.fetch_argv(str(target)), capture_output=True, check=True).stdout == data
    assert lab.shell_argv("echo 'a b' && true") == ["/bin/sh", "-c", "echo 'a b' && true"]
    assert "dynamos_lab_expect_warning" in lab.trouble_message("l1", "sh", ["WARNING: CPU: 0 PID: 1 at x"])


def test_health_check_reads_the_log_after_the_last_marker():
    health = load("plugins/modules/dynamos_health.py")
    lines = ["boot", "dynamos-health: mark m1", "old WARNING", "dynamos-health: mark m2",
             "livepatch: 'x': patching complete"]
    assert health.since_marker(lines, "dynamos-health: mark m2") == ["livepatch: 'x': patching complete"]
    assert health.since_marker(lines, "dynamos-health: mark gone") is None
    assert health.TROUBLE.search("WARNING: CPU: 0 PID: 7 at fs/x.c:1 f+0x1/0x2")
    assert health.TROUBLE.search("livepatch: failed to register patch 'x'")
    assert not health.TROUBLE.search("livepatch: 'x': patching complete")
    assert not health.TROUBLE.search("fleet_good: module verification failed: signature and/or required key missing")


def test_expected_warning_takes_its_call_trace_along():
    trouble = ["[ 1.0] WARNING: CPU: 0 PID: 9 at x.c:3 bad_fn+0x1/0x2 [m]", "[ 1.1] Call Trace:",
               "[ 2.0] BUG: unable to handle page fault", "[ 2.1] Call Trace:"]
    unexpected, expected = split_expected(trouble, "bad_fn")
    assert expected == trouble[:2] and unexpected == trouble[2:]
    assert split_expected(trouble, None) == (trouble, [])


def test_collection_builds_and_installs_with_ansible_galaxy(tmp_path):
    galaxy = str(Path(sys.executable).parent / "ansible-galaxy")
    subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("dynamos-kernel-*.tar.gz")
    subprocess.run([galaxy, "collection", "install", str(archive), "-p", str(tmp_path / "installed")],
                   check=True, capture_output=True)
    installed = tmp_path / "installed" / "ansible_collections" / "dynamos" / "kernel"
    for part in ("plugins/connection/lab.py", "plugins/modules/dynamos_update.py", "plugins/action/dynamos_update.py",
                 "roles/rollout/tasks/main.yml"):
        assert (installed / part).is_file(), part
