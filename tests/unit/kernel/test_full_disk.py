"""A full disk under dynamos' own files: every change is refused with the file named and nothing
loaded, or made with a note, and no torn or half-written file is left (the lab fills real tmpfs
mounts: tests/lab/test_faults_lab.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from dynamos.errors import RefusedError
from dynamos.kernel import actionlog, journal, state, trust
from dynamos.kernel.journal import lock_holder
from tests.support.harness import KernelHarness


def _no_space(*_args, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_lock_that_cannot_be_written_refuses_and_is_not_left_held(harness: KernelHarness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    with monkeypatch.context() as m:
        m.setattr(journal.os, "pwrite", _no_space)
        with pytest.raises(RefusedError, match="nothing was changed: cannot write the lock .*No space left"):
            h.apply("fix-x")
    assert not h.syscalls("init_module") and lock_holder(h.sim.root) is None
    assert h.apply("fix-x").livepatch_name == "fix_x"


def test_a_short_write_to_the_log_leaves_no_torn_line(harness: KernelHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    h.apply("fix-x")
    real_write = os.write

    def half(fd: int, data: bytes) -> int:  # what a nearly full tmpfs does: part of the line, then nothing
        return real_write(fd, data[: len(data) // 2])

    with monkeypatch.context() as m:
        m.setattr(actionlog.os, "write", half)
        with pytest.raises(RefusedError, match="cannot write the action log .*short write"):
            h.kernel.revert("fix-x")
    assert h.sim.patches["fix_x"].enabled
    h.kernel.revert("fix-x")
    lines = h.log_path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole
    assert h.kernel.journal.pending() == [] and [e["result"] for e in h.log()][-1] == "ok"


def test_a_record_that_cannot_be_written_refuses_before_loading(harness: KernelHarness,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    pkg = h.add("fix-x")
    with monkeypatch.context() as m:
        m.setattr(state.os, "replace", _no_space)
        with pytest.raises(RefusedError, match="nothing was loaded: cannot write the record .*No space left"):
            h.kernel.apply(pkg)
    assert not h.syscalls("init_module") and not list((h.sim.root / "run/dynamos/updates").iterdir())
    assert h.kernel.journal.pending() == [] and h.log()[-1]["result"] == "refused"


def test_an_unwritable_accepted_store_only_costs_a_note(harness: KernelHarness,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    pkg = h.add("fix-x")
    real_replace = os.replace

    def replace(src, dst):  # the accepted store's disk is full, the record's is not
        if Path(dst).parent.name == "accepted":
            _no_space()
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(trust.os, "replace", replace)
        result = h.kernel.apply(pkg)
    assert any("could not record the package as accepted" in n for n in result.notes), result.notes
    assert h.sim.patches["fix_x"].enabled and h.record("fix_x").exists()
    accepted = h.sim.root / "var/lib/dynamos/accepted"
    assert not [p for p in accepted.iterdir() if p.name.endswith(".tmp")] if accepted.exists() else True
