"""Consistency models on the real kernel: a format change across a writer and a reader thread
is never seen mixed under global consistency; the global switch waits for calls in flight and
refuses, naming the task, when they stay."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from .conftest import LAB_UPDATES, build_test_module
from .conftest import uniprocessor_guest as conftest_uniprocessor_guest

pytestmark = pytest.mark.lab

PARAMS = "/sys/module/dynamos_pair/parameters"
# Each apply/revert cycle costs ~20 s of CI on this guest; bench/bench_two_vcpu_stalls.py and
# bench/bench_stress.py run the long versions. Per-task is printed for contrast, not asserted.
GLOBAL_APPLIES, PER_TASK_APPLIES = 4, 2


@pytest.fixture(scope="session")
def pair_module(target, workdir) -> tuple[str, Path]:
    """The dynamos_pair test module, and a directory holding a copy of it with BTF."""
    return build_test_module(target, workdir, "dynamos_pair")


def per_task_variant(workdir: Path) -> Path:
    """pair-format with livepatch's per-task model: the same editions, switched task by task."""
    src = workdir / "src" / "pair-pertask"
    shutil.copytree(LAB_UPDATES / "pair-format", src, dirs_exist_ok=True)
    toml = (src / "update.toml").read_text()
    toml = toml.replace('name = "pair-format"', 'name = "pair-pertask"')
    toml = toml.replace('consistency = "global"\ntransfer = "pair_convert"\n', "")
    (src / "update.toml").write_text(toml)
    return src


def counters(guest) -> tuple[int, int]:
    reads, mixed = guest.sh(f"cat {PARAMS}/reads {PARAMS}/mixed").split()
    return int(reads), int(mixed)


@pytest.fixture(scope="module")
def two_cpu_guest(target, workdir):
    """The dynamos_pair tests' lab: two CPUs (mixing across CPUs is what global consistency must
    prevent, and one CPU could not show it), run by QEMU on one host thread: under multi-threaded
    TCG, livepatching this module's functions while its threads call them hangs a thread at the
    function's ftrace site, a QEMU fault (see conftest.uniprocessor_guest)."""
    with conftest_uniprocessor_guest(target, workdir, "pair", cpus=2, tcg_threads="single") as guest:
        yield guest


def test_global_consistency_never_mixes_formats_across_applies(two_cpu_guest, build, workdir, pair_module):
    guest = two_cpu_guest
    assert int(guest.sh("nproc")) == 2
    module, btf_dir = pair_module
    global_pkg = build(LAB_UPDATES / "pair-format", module_dirs=(btf_dir,))
    per_task_pkg = build(per_task_variant(workdir), module_dirs=(btf_dir,))
    guest.load_module(module)
    try:
        time.sleep(1)
        reads0, mixed0 = counters(guest)
        assert reads0 > 0 and mixed0 == 0
        stops = []
        for _ in range(GLOBAL_APPLIES):
            applied = json.loads(guest.dynamos("apply", str(global_pkg), "--json").stdout)
            assert any("global switch to the new editions" in n for n in applied["notes"]), applied
            state = dict(line.split(" ", 1) for line in guest.read("/sys/module/pair_format/dynamos/global")
                         .splitlines())
            assert state["state"] == "new"
            stops.append(int(state["longest_stop_ns"]))
            guest.sh("sleep 0.5")
            assert counters(guest)[1] == 0
            r = guest.run("sh", "-c", "cat /sys/module/pair_format/dynamos/*/editions")
            assert all(int(line.split()[2]) > 0 for line in r.stdout.decode().splitlines()
                       if line.split()[0] == "1"), r.stdout  # the new editions ran
            guest.dynamos("revert", "pair-format")
        reads1, mixed1 = counters(guest)
        assert reads1 > reads0
        assert mixed1 == 0, f"{mixed1} mixed-edition encounters under global consistency"

        for _ in range(PER_TASK_APPLIES):
            guest.dynamos("apply", str(per_task_pkg))
            guest.sh("sleep 0.5")
            guest.dynamos("revert", "pair-pertask")
        reads2, mixed2 = counters(guest)
        assert reads2 > reads1
        assert guest.sh("ls /sys/kernel/livepatch").split() == []
    finally:
        guest.unload_module("dynamos_pair")
    print(f"consistency: global {GLOBAL_APPLIES} applies, 0 mixed in {reads1 - reads0} reads, longest all-CPU "
          f"stop {max(stops) / 1000:.0f} us; per-task {PER_TASK_APPLIES} applies: {mixed2 - mixed1} mixed in "
          f"{reads2 - reads1} reads",
          file=sys.stderr)


def test_global_switch_waits_for_calls_in_flight_and_refuses_naming_the_task(guest, build):
    guest.dynamos("apply", str(build(LAB_UPDATES / "pipe-read-global")))
    try:
        # A reader blocked on an empty pipe sits inside the new edition of pipe_read.
        guest.sh("rm -f /tmp/dynamos-fifo; mkfifo /tmp/dynamos-fifo; "
                 "setsid sh -c 'exec 3<>/tmp/dynamos-fifo; exec cat /tmp/dynamos-fifo' "
                 "</dev/null >/dev/null 2>&1 & sleep 1")
        r = guest.dynamos("revert", "pipe-read-global", "--timeout", "2", check=False)
        assert r.status == 5, r
        err = r.stderr.decode()
        assert "revert refused, nothing was changed" in err and "pipe_read" in err, err
        assert "cat (pid" in err, err
        assert guest.livepatches() == ["pipe_read_global"]
        state = dict(line.split(" ", 1) for line in guest.read("/sys/module/pipe_read_global/dynamos/global")
                     .splitlines())
        assert state["state"] == "new" and "call(s) in flight" in state["last_busy"]
        assert int(state["attempts"]) > 2  # retried with backoff until the timeout
    finally:
        guest.sh("pkill -x cat; sleep 0.5; rm -f /tmp/dynamos-fifo")
    guest.dynamos("revert", "pipe-read-global")


def test_blocked_reader_is_signalled_so_the_transition_ends_before_livepatch_would_signal(guest, build, workdir):
    """A reader asleep in pipe_read holds up the transition; livepatch signals such tasks only after
    15 s, dynamos from 1 s on, so a 10 s timeout suffices both ways."""
    src = workdir / "src" / "pipe-read-signal"
    shutil.copytree(LAB_UPDATES / "pipe-read-global", src, dirs_exist_ok=True)
    toml = (src / "update.toml").read_text().replace('consistency = "global"\n', "")
    toml = toml.replace('name = "pipe-read-global"', 'name = "pipe-read-signal"')
    (src / "update.toml").write_text(toml.replace('edition = "pipe_read_counted"', 'editions = ["pipe_read_counted"]'))
    pkg = build(src)
    guest.sh("rm -f /tmp/dynamos-fifo; mkfifo /tmp/dynamos-fifo; "
             "setsid sh -c 'exec 3<>/tmp/dynamos-fifo; exec cat /tmp/dynamos-fifo' "
             "</dev/null >/dev/null 2>&1 & sleep 1")
    try:
        reader = guest.sh("pidof cat").split()
        assert len(reader) == 1
        applied = json.loads(guest.dynamos("apply", str(pkg), "--timeout", "10", "--json").stdout)
        assert any(f"cat (pid {reader[0]}) in pipe_read" in n for n in applied["notes"]), applied["notes"]
        assert any(n.startswith("signalled the tasks still to switch at 1") for n in applied["notes"]), (
            applied["notes"], applied["phases"])
        assert applied["phases"]["transition"] < 10
        assert guest.sh("pidof cat").split() == reader  # the fake signal restarted its read: still there
        guest.sh("echo hello > /tmp/dynamos-fifo; sleep 0.5")
        editions = guest.read("/sys/module/pipe_read_signal/dynamos/pipe_read/editions").splitlines()
        assert int(editions[1].split()[2]) > 0  # the reader now reads through the new edition
        r = json.loads(guest.dynamos("revert", "pipe-read-signal", "--timeout", "10", "--json").stdout)
        assert r["phases"]["transition"] < 10
        assert guest.sh("pidof cat").split() == reader
    finally:
        guest.sh("pkill -x cat; sleep 0.5; rm -f /tmp/dynamos-fifo")
        if guest.livepatches():
            guest.dynamos("revert", "pipe-read-signal")
