"""Several editions of a kernel function live at once, on the real Debian kernel: switched per
call under load, per pid, per cgroup, by share and by an adaptation handler; monitored; retired."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLES, LAB_UPDATES

pytestmark = pytest.mark.lab

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
GIB = 1 << 30


def scenario(guest, name: str, *args: str, timeout: float = 600) -> object:
    r = guest.run(sys.executable, str(SCENARIOS / name), *args, timeout=timeout)
    return json.loads(r.stdout)


def editions_of(guest, update: str) -> dict:
    (u,) = json.loads(guest.dynamos("status", update, "--json").stdout)["updates"]
    (f,) = u["editions"]
    return f


def test_pipe_stream_survives_twenty_switches_among_three_editions(guest, build):
    """Seed scenario: 1 GiB through a pipe while pipe_write flips among original and two editions."""
    guest.dynamos("apply", str(build(LAB_UPDATES / "pipe-editions")))
    try:
        report = scenario(guest, "pipe_stream.py", str(GIB), "20")
    finally:
        guest.dynamos("revert", "pipe-editions")
    assert report["writer_status"] == 0
    assert report["bytes"] == GIB
    assert report["received"] == report["sent"]
    assert report["switches"] >= 20, report
    calls = {e["index"]: e["calls"] for e in report["editions"]}
    assert all(calls[i] > 0 for i in (0, 1, 2)), calls
    assert sum(calls.values()) >= GIB // (64 * 1024)  # every write reached a dispatcher
    assert all(e["in_flight"] == 0 for e in report["editions"])
    print(f"pipe: {report['bytes'] >> 20} MiB in {report['seconds']:.1f} s, {report['switches']} switches, "
          f"calls per edition {calls}", file=sys.stderr)


def test_cfs_edition_moves_cpu_share_between_cgroups_and_back(guest, build):
    """Seed scenario: update_curr editions charge cgroup A's task 3x or 0.5x its virtual time.

    Against an equal CPU-bound peer on the same CPU that predicts shares of 1/4 and 2/3; the
    tolerance is +-0.08 (tick-sampled CPU times over 3 s windows under TCG).
    """
    guest.dynamos("apply", str(build(LAB_UPDATES / "sched-weight")))
    try:
        shares = scenario(guest, "sched_share.py", "3")
    finally:
        guest.dynamos("revert", "sched-weight")
    print(f"sched: CPU share of cgroup A per phase {shares}", file=sys.stderr)
    assert abs(shares["original"] - 0.5) < 0.08, shares
    assert abs(shares["heavy"] - 0.25) < 0.08, shares
    assert abs(shares["light"] - 2 / 3) < 0.08, shares
    assert abs(shares["reset"] - 0.5) < 0.08, shares


@pytest.mark.parametrize("mode", ["pids", "cgroup"])
def test_concurrent_callers_see_the_edition_their_route_names(guest, build, mode):
    guest.dynamos("apply", str(build(EXAMPLES / "cmdline-editions")))
    try:
        seen = scenario(guest, "readers.py", mode, "cmdline-editions")
        route_after = editions_of(guest, "cmdline-editions")["route"]
    finally:
        guest.dynamos("revert", "cmdline-editions")
    assert seen == [{"[edition 1]": 300}, {"[edition 2]": 300}, {"original": 300}], seen
    assert route_after == ["default 0"]  # the scenario reset the route


def test_adaptation_handler_chooses_per_call(guest, build):
    guest.dynamos("apply", str(build(LAB_UPDATES / "cmdline-handler")))
    try:
        seen = scenario(guest, "readers.py", "handler", "cmdline-handler")
        counts = {e["index"]: e["calls"] for e in editions_of(guest, "cmdline-handler")["editions"]}
    finally:
        guest.dynamos("revert", "cmdline-handler")
    assert seen == [{"[one]": 300}, {"[two]": 300}, {"original": 300}]
    assert counts[1] == 300 and counts[2] == 300 and counts[0] >= 300


def test_share_policy_over_ten_thousand_calls(guest, build):
    """10 % of calls to edition 2, the rest to the default edition 1: per-CPU call counters make
    it exact to within one call per CPU; the tolerance asserted is +-0.5 %."""
    guest.dynamos("apply", str(build(EXAMPLES / "cmdline-editions")))
    try:
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "1")
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "cmdline_show_tag_two", "--share", "10")
        r = guest.run(sys.executable, "-c", "import collections\nc = collections.Counter()\n"
                      "for _ in range(10000):\n    c[open('/proc/cmdline').read().split()[1]] += 1\n"
                      "print(c['1]'], c['2]'])")
        ones, twos = map(int, r.stdout.split())
        f = editions_of(guest, "cmdline-editions")
    finally:
        guest.dynamos("revert", "cmdline-editions")
    assert ones + twos == 10000
    assert abs(twos - 1000) <= 50, (ones, twos)
    calls = {e["index"]: e["calls"] for e in f["editions"]}
    assert calls[2] == twos and calls[1] == ones  # the runtime's counters agree with what was seen
    assert f["route"] == ["default 1", "share 2 1000"]


def test_monitor_counts_every_call_and_times_them(guest, workdir):
    """`dynamos monitor` run on the target itself: writes, builds (BTF prototype, in the guest) and applies."""
    out = guest.dynamos("monitor", "cmdline_proc_show", "--name", "monitor-cmdline", "-o", str(workdir),
                        timeout=600).stdout.decode()
    try:
        assert "applied monitor-cmdline" in out and "dynamos revert monitor-cmdline" in out
        guest.run(sys.executable, "-c", "for _ in range(500): open('/proc/cmdline').read()")
        (row,) = json.loads(guest.dynamos("monitor", "--show", "--json").stdout)
        table = guest.dynamos("monitor", "--show", "--once").stdout.decode()
    finally:
        guest.dynamos("revert", "monitor-cmdline")
    assert row["function"] == "cmdline_proc_show" and row["edition"] == 0
    assert row["calls"] == 500  # nothing else in the lab reads /proc/cmdline
    assert sum(row["log2_ns_buckets"]) == 500
    assert 0 < row["p50_ns"] <= row["p99_ns"] and row["mean_ns"] > 0
    assert "cmdline_proc_show" in table and "500" in table


def test_retire_waits_for_calls_in_flight_and_reports_when_they_stay(guest, build):
    guest.dynamos("apply", str(build(LAB_UPDATES / "held-edition")))
    hold = "/sys/module/held_edition/parameters/hold"
    try:
        guest.sh(f"echo 1 > {hold}")
        # A reader enters edition 1 and stays there; retiring must time out and name it.
        guest.sh("setsid sh -c 'cat /proc/cmdline > /tmp/held.out' </dev/null >/dev/null 2>&1 & sleep 1")
        f = editions_of(guest, "held-edition")
        assert f["editions"][1]["in_flight"] == 1
        r = guest.dynamos("retire", "held-edition", "cmdline_proc_show", "1", "--timeout", "1", "--json",
                          check=False)
        assert r.status == 6, r
        report = json.loads(r.stdout)
        assert not report["drained"] and report["in_flight"] == 1
        assert [h["comm"] for h in report["holders"]] == ["cat"], report
        assert any(frame.startswith("cmdline_show_held+") for frame in report["holders"][0]["stack"])
        assert b"still run in it" in r.stderr
        # New calls no longer reach the retired edition, while the held one is still inside it.
        assert not guest.read("/proc/cmdline").startswith("[held]")
        # A second retire waits; the call is released only once that retire says it is waiting
        # (after a second of it), so the wait is proven however slowly the guest CLI starts.
        out = guest.sh(
            f"{sys.executable} -m dynamos retire held-edition cmdline_proc_show 1 --timeout 60 "
            f">/tmp/retire.out 2>/tmp/retire.err & pid=$!; n=0; "
            f"until grep -q 'waiting for 1 call' /tmp/retire.err || [ $n -ge 600 ]; do sleep 0.1; n=$((n+1)); done; "
            f"echo 0 > {hold}; wait $pid; echo status $?; cat /tmp/retire.out", timeout=120)
        assert "status 0" in out, out + guest.read("/tmp/retire.err")
        waited = float(re.search(r"no call left in it after ([0-9.]+) s", out).group(1))
        assert waited > 1, out
        assert guest.read("/tmp/held.out").startswith("[held] ")  # the held call finished in its edition
        states = {e["index"]: e["live"] for e in editions_of(guest, "held-edition")["editions"]}
        assert states == {0: True, 1: False}
    finally:
        guest.sh(f"echo 0 > {hold}")
        guest.dynamos("revert", "held-edition")


def test_bad_switches_are_refused_and_change_nothing(guest, build):
    guest.dynamos("apply", str(build(EXAMPLES / "cmdline-editions")))
    try:
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "2", "--cpus", "1")
        before = editions_of(guest, "cmdline-editions")["route"]
        for args, status, message in [
            (["cmdline_proc_show", "7"], 5, b"has no edition '7'"),
            (["nosuch", "1"], 5, b"nosuch is not a multi-edition function"),
            (["cmdline_proc_show", "1", "--cpus", "0-99999"], 5, b"refused"),
            (["cmdline_proc_show", "1", "--cgroup", "/tmp"], 5, b"not inside the cgroup v2 hierarchy"),
            (["cmdline_proc_show", "0", "--share", "101"], 64, b"percentage"),  # a bad argument: a usage error
            (["cmdline_proc_show", "1", "--reset"], 5, b"--reset takes no edition"),
        ]:
            r = guest.dynamos("switch", "cmdline-editions", *args, check=False)
            assert r.status == status and message in r.stderr, (args, r)
        assert editions_of(guest, "cmdline-editions")["route"] == before
        r = guest.dynamos("switch", "no-such-update", "f", "1", check=False)
        assert r.status == 5 and b"no update named no_such_update is loaded" in r.stderr
        r = guest.dynamos("retire", "cmdline-editions", "cmdline_proc_show", "0", check=False)
        assert r.status == 5 and b"always stays selectable" in r.stderr
    finally:
        guest.dynamos("revert", "cmdline-editions")


def test_switch_cli_routes_and_status_shows_counts(guest, build):
    guest.dynamos("apply", str(build(EXAMPLES / "cmdline-editions")))
    try:
        assert not guest.read("/proc/cmdline").startswith("[edition")
        out = guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "cmdline_show_tag_two").stdout
        assert b"route default 2" in out
        assert guest.read("/proc/cmdline").startswith("[edition 2] console=")
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "--reset")
        assert not guest.read("/proc/cmdline").startswith("[edition")
        text = guest.dynamos("status").stdout.decode()
        assert "cmdline_show_tag_two" in text and "IN-FLIGHT" in text
    finally:
        guest.dynamos("revert", "cmdline-editions")


@pytest.fixture(scope="session")
def pipe_children(workdir) -> str:
    """A small C program that starts short-lived children writing to a pipe (built on the host)."""
    out = workdir / "pipe_children"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(Path(__file__).parent / "programs" / "pipe_children.c")],
                   check=True)
    return str(out)


def pipe_bytes(guest) -> dict:
    lines = guest.read("/proc/dynamos_pipe_bytes").splitlines()
    head = {k: int(v) for k, v in (line.split() for line in lines[:3])}
    tasks = {int(line.split()[1]): int(line.split()[3]) for line in lines[3:]}
    return {**head, "tasks": tasks}


def test_shadow_data_per_task_created_on_demand_freed_at_exit_and_on_revert(guest, build, pipe_children):
    """DynAMOS' shadow data example: bytes written to pipes per task, no leak over 10,000 tasks."""
    guest.dynamos("apply", str(build(EXAMPLES / "pipe-bytes")))
    try:
        before = pipe_bytes(guest)
        # A task's own count: this shell writes 6 bytes into a pipe, then reads its shadow.
        own = guest.sh("printf abcdef | cat >/dev/null; grep -c . /proc/dynamos_pipe_bytes")
        assert int(own) >= 3
        r = guest.run(pipe_children, "10000", timeout=600)
        assert r.stdout.decode().strip() == "30000"
        after = pipe_bytes(guest)
    finally:
        guest.dynamos("revert", "pipe-bytes")
    assert after["created"] - before["created"] >= 10000  # every child got its shadow on its first write
    assert after["freed_at_exit"] - before["freed_at_exit"] >= 10000  # and lost it when it exited
    assert after["live"] - before["live"] <= 2, (before, after)  # no leak: at most the test's own tasks
    assert after["live"] == len(after["tasks"])
    assert guest.run("test", "-e", "/proc/dynamos_pipe_bytes", check=False).status != 0
    assert "dynamos pipe-bytes: reverted, freed" in guest.sh("dmesg | tail -5")


def test_runtime_replaced_live_keeps_route_and_counters(guest, build, workdir):
    """Updating the updater: a cumulative update with its own copy of the edition runtime takes
    over the running one's route and counters, and the calls keep being counted across."""
    src = workdir / "src" / "cmdline-editions-next"
    shutil.copytree(EXAMPLES / "cmdline-editions", src, dirs_exist_ok=True)
    toml = (src / "update.toml").read_text().replace('name = "cmdline-editions"',
                                                     'name = "cmdline-editions-next"\nreplace = true')
    (src / "update.toml").write_text(toml)
    read_100 = "for _ in range(100): open('/proc/cmdline').read()"
    guest.dynamos("apply", str(build(EXAMPLES / "cmdline-editions")))
    try:
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "2")
        guest.dynamos("switch", "cmdline-editions", "cmdline_proc_show", "1", "--share", "50")
        guest.run(sys.executable, "-c", read_100)
        before = editions_of(guest, "cmdline-editions")
        guest.dynamos("apply", str(build(src)))
        assert "cmdline_editions" not in guest.modules()  # the old runtime is gone
        taken = editions_of(guest, "cmdline-editions-next")
        guest.run(sys.executable, "-c", read_100)
        after = editions_of(guest, "cmdline-editions-next")
        tags = guest.run(sys.executable, "-c", "print(sorted({open('/proc/cmdline').read()[:11] "
                         "for _ in range(40)}))").stdout.decode()
        log = guest.sh("dmesg | grep 'taking over route and counters' | tail -1")
    finally:
        guest.sh("true")
        for name in ("cmdline-editions-next", "cmdline-editions"):
            if name.replace("-", "_") in guest.livepatches() or name.replace("-", "_") in guest.modules():
                guest.dynamos("revert", name)
    assert before["route"] == ["default 2", "share 1 5000"]
    assert taken["route"] == before["route"]  # the policy stays
    calls = {e["index"]: e["calls"] for e in before["editions"]}
    assert sum(calls.values()) == 100 and calls[1] == 50 and calls[2] == 50
    assert [e["calls"] for e in taken["editions"]] == [calls[0], calls[1], calls[2]]  # counts carried over
    assert sum(e["calls"] for e in after["editions"]) == 200  # and kept counting
    assert "[edition 1]" in tags and "[edition 2]" in tags
    assert "cmdline_proc_show: taking over route and counters from runtime version 2" in log


def test_cumulative_update_takes_over_the_shadow_state_of_the_one_it_replaces(guest, build, workdir):
    """pipe-bytes replaced by a cumulative update with the same klp_state: the per-task counts
    in shadow data stay and are served by the new update's file; its revert frees them."""
    v2 = workdir / "src" / "pipe-bytes-v2"
    shutil.copytree(EXAMPLES / "pipe-bytes", v2, dirs_exist_ok=True)
    toml = (v2 / "update.toml").read_text().replace('name = "pipe-bytes"', 'name = "pipe-bytes-v2"\nreplace = true')
    (v2 / "update.toml").write_text(toml.replace("version = 1", "version = 2"))
    guest.dynamos("apply", str(build(EXAMPLES / "pipe-bytes")))
    try:
        # a long-lived task that wrote 6 bytes: sh prints, then becomes sleep (same task)
        guest.sh("(setsid sh -c 'printf abcdef; exec sleep 120' | cat) </dev/null >/dev/null 2>&1 & sleep 1")
        [writer] = [pid for pid, n in pipe_bytes(guest)["tasks"].items() if n == 6
                    and guest.read(f"/proc/{pid}/comm").strip() == "sleep"]
        applied = json.loads(guest.dynamos("apply", str(build(v2)), "--json").stdout)
        assert applied["replaced"] == ["pipe_bytes"] and guest.livepatches() == ["pipe_bytes_v2"]
        assert "dynamos pipe-bytes: took over" in guest.sh("dmesg | tail -5")
        taken = pipe_bytes(guest)
        assert taken["tasks"][writer] == 6  # the count survived the replacement
        assert taken["live"] == len(taken["tasks"])
        guest.sh("printf abc | cat >/dev/null")
        assert pipe_bytes(guest)["created"] >= 1  # the new update keeps counting
    finally:
        guest.sh("pkill -xf 'sleep 120'; true")
        for name in guest.livepatches():
            guest.dynamos("revert", name)
    assert guest.run("test", "-e", "/proc/dynamos_pipe_bytes", check=False).status != 0
    assert "dynamos pipe-bytes: reverted, freed" in guest.sh("dmesg | tail -5")
