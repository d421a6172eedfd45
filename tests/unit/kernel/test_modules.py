"""/proc/modules, the kernel log, errno explanations, unload retries and the action log."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from dynamos.kernel.actionlog import ActionLog, default_log_path
from dynamos.kernel.modules import (
    explain_load_error,
    explain_unload_error,
    kernel_messages,
    last_kmsg_seq,
    loaded_modules,
    unload_module,
)
from tests.support.harness import KernelHarness


def test_proc_modules_parsing(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text(
        "fix_x 16384 1 - Live 0xffffffffc0a00000 (OEK)\n"
        "ext4 999424 2 mbcache,jbd2, Live 0xffffffffc0800000\n"
        "short line\n"
    )
    mods = loaded_modules(tmp_path)
    assert set(mods) == {"fix_x", "ext4"}
    assert mods["fix_x"].is_livepatch and mods["fix_x"].refcount == 1 and mods["fix_x"].taints == "OEK"
    assert not mods["ext4"].is_livepatch and mods["ext4"].state == "Live"
    assert loaded_modules(tmp_path / "missing") == {}


def _kmsg(root: Path, lines: list[str]) -> None:
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev/kmsg").write_text("".join(lines))


def test_kernel_messages_filter_by_module_livepatch_and_bookmark(tmp_path: Path) -> None:
    _kmsg(tmp_path, [
        "6,10,100,-;livepatch: old message\n",
        "4,11,200,-;fix_x: Unknown symbol foo (err -2)\n",
        " SUBSYSTEM=module\n",
        "6,12,300,-;eth0: link up\n",
        "3,13,400,-;livepatch: symbol 'bar' not found in symbol table\n",
    ])
    assert last_kmsg_seq(tmp_path) == 13
    assert kernel_messages(tmp_path, "fix_x", since=10) == [
        "fix_x: Unknown symbol foo (err -2)",
        "livepatch: symbol 'bar' not found in symbol table",
    ]
    assert kernel_messages(tmp_path, "fix_x", limit=1) == ["livepatch: symbol 'bar' not found in symbol table"]
    assert kernel_messages(tmp_path / "none", "fix_x") == [] and last_kmsg_seq(tmp_path / "none") == -1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EEXIST, "a module named fix_x is already loaded"),
        (errno.ENOEXEC, "invalid module format (vermagic/ELF mismatch"),
        (errno.EKEYREJECTED, "signature required"),
        (errno.ENOENT, "unknown symbol"),
        (errno.EBUSY, "another livepatch is in transition"),
        (errno.EINVAL, "see dmesg"),
        (errno.EPERM, "CAP_SYS_MODULE"),
        (errno.ENOMEM, "Cannot allocate memory"),
    ],
)
def test_explain_load_error(tmp_path: Path, code: int, expected: str) -> None:
    assert expected in explain_load_error(OSError(code, "x"), "fix_x", tmp_path)


def test_explain_load_error_eperm_under_lockdown_and_modules_disabled(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/security").mkdir(parents=True)
    (tmp_path / "sys/kernel/security/lockdown").write_text("none [integrity] confidentiality\n")
    msg = explain_load_error(OSError(errno.EPERM, "x"), "fix_x", tmp_path)
    assert "signature required" in msg and "lockdown (integrity)" in msg
    (tmp_path / "sys/kernel/security/lockdown").write_text("[none] integrity confidentiality\n")
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/modules_disabled").write_text("1\n")
    assert "modules_disabled" in explain_load_error(OSError(errno.EPERM, "x"), "fix_x", tmp_path)


def test_explain_errors_quote_the_kernel_log(tmp_path: Path) -> None:
    _kmsg(tmp_path, ["4,1,1,-;fix_x: disagrees about version of symbol module_layout\n"])
    msg = explain_load_error(OSError(errno.ENOEXEC, "x"), "fix_x", tmp_path)
    assert "kernel log:" in msg and "disagrees about version" in msg
    assert "kernel log" not in explain_load_error(OSError(errno.ENOEXEC, "x"), "fix_x", tmp_path, since=1)
    assert "still in use" in explain_unload_error(OSError(errno.EAGAIN, "x"), "fix_x", tmp_path, since=1)
    assert "no module named fix_x" in explain_unload_error(OSError(errno.ENOENT, "x"), "fix_x", tmp_path)


def test_unload_module_retries_while_referenced(harness: KernelHarness) -> None:
    sim = harness.sim
    sim.add_module("fix_x", livepatch=True)
    sim.modules["fix_x"].refs = 1
    original_sleep = sim.sleep

    def sleep(seconds: float) -> None:  # the reference goes away after the third poll
        original_sleep(seconds)
        if sim.polls == 3:
            sim.modules["fix_x"].refs = 0

    sim.sleep = sleep  # type: ignore[method-assign]
    unload_module(sim, "fix_x", timeout=5.0, poll=0.1)
    assert "fix_x" not in sim.modules
    assert [c for c in sim.calls if c[0] == "delete_module"] == [("delete_module", "fix_x")] * 4


def test_unload_module_gives_up_after_timeout(harness: KernelHarness) -> None:
    sim = harness.sim
    sim.add_module("fix_x", livepatch=True)
    sim.modules["fix_x"].refs = 1
    with pytest.raises(OSError) as info:
        unload_module(sim, "fix_x", timeout=1.0, poll=0.25)
    assert info.value.errno == errno.EAGAIN and sim.now == pytest.approx(1001.0)
    with pytest.raises(OSError) as info:
        unload_module(sim, "nope", timeout=1.0, poll=0.25)
    assert info.value.errno == errno.ENOENT  # not retried


def test_action_log_appends_json_lines(tmp_path: Path) -> None:
    log = ActionLog(tmp_path / "var/log/dynamos/actions.log")
    assert log.record("apply", "fix_x", "ok", 1.25, {"package": "/p"})
    assert log.record("revert", "fix_x", "refused", 0.0)
    lines = (tmp_path / "var/log/dynamos/actions.log").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"time", "action", "name", "result", "seconds", "details"}
    assert (first["action"], first["name"], first["result"], first["seconds"]) == ("apply", "fix_x", "ok", 1.25)
    assert first["details"] == {"package": "/p"}
    assert [e["action"] for e in log.entries()] == ["apply", "revert"]


def test_action_log_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNAMOS_LOG", raising=False)
    assert default_log_path(tmp_path) == tmp_path / "var/log/dynamos/actions.log"
    monkeypatch.setenv("DYNAMOS_LOG", str(tmp_path / "mine.log"))
    assert default_log_path(tmp_path) == tmp_path / "mine.log"


def test_action_log_failure_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    log = ActionLog(tmp_path / "file" / "actions.log")  # parent is a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="dynamos.kernel"):
        assert log.record("apply", "fix_x", "ok", 0.1) is False
    assert "could not write the action log" in caplog.text
    assert log.entries() == []
