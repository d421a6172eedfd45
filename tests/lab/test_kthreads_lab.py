"""Kernel threads that never leave their main function, on the real kernel: detected before
loading, restarted onto the new edition with their state carried over, and back on revert."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dynamos.demo import guest_env

from .conftest import EXAMPLES, LAB_UPDATES, Guest, build_test_module, uniprocessor_guest

pytestmark = pytest.mark.lab

PARAMS = "/sys/module/dynamos_ticker/parameters"
THREAD = "/sys/module/ticker_restart/dynamos/dynamos_ticker:dynamos_ticker_main/thread"


@pytest.fixture(scope="module")
def guest(target, workdir):
    """This module's own one-vCPU lab: kswapd's test puts the guest under memory pressure, which
    on two TCG vCPUs intermittently stalls the hog for tens of seconds (a soft lockup)."""
    with uniprocessor_guest(target, workdir, "kthreads") as guest:
        yield guest


@pytest.fixture(scope="module")
def ticker(target, workdir, guest):
    """The dynamos_ticker module loaded in the lab; the BTF directory its updates build with."""
    module, btf_dir = build_test_module(target, workdir, "dynamos_ticker")
    guest.load_module(module)
    yield btf_dir
    guest.unload_module("dynamos_ticker")


@pytest.fixture(autouse=True)
def kernel_left_as_found(guest):
    """This module's tests keep dynamos_ticker loaded throughout; no update may stay behind."""
    assert guest.revert_leftovers() == [], "a previous test left a live update behind"
    yield
    assert guest.revert_leftovers() == [], "the test left a live update behind"


def ticker_state(guest: Guest) -> dict[str, int]:
    names = ("iterations", "edition", "gaps", "most_running")
    values = guest.sh(" ".join(["cat"] + [f"{PARAMS}/{n}" for n in names])).split()
    return dict(zip(names, map(int, values), strict=True))


def ticker_threads(guest: Guest) -> list[int]:
    """Pids of the tasks named dynamos_ticker."""
    out = guest.sh("for d in /proc/[0-9]*; do [ \"$(cat $d/comm 2>/dev/null)\" = dynamos_ticker ] && "
                   "echo ${d#/proc/}; done; true")
    return [int(p) for p in out.split()]


def counting(guest: Guest, edition: int) -> dict[str, int]:
    """The ticker's state once it has iterated a while on ``edition``: one thread, no gap."""
    before = ticker_state(guest)
    time.sleep(0.5)
    state = ticker_state(guest)
    assert state["iterations"] > before["iterations"], (before, state)
    assert state["edition"] == edition, state
    assert state["gaps"] == 0, f"{state['gaps']} iterations lost or repeated across a restart"
    assert state["most_running"] == 1, "two ticker threads ran at once"
    assert len(ticker_threads(guest)) == 1
    return state


def without_restart(workdir: Path) -> Path:
    """ticker-restart without its [[kthread]] table: nothing says how to move the thread."""
    src = workdir / "src" / "ticker-plain"
    shutil.copytree(LAB_UPDATES / "ticker-restart", src, dirs_exist_ok=True)
    toml = (src / "update.toml").read_text()
    head, rest = toml.split("[[kthread]]", 1)
    toml = head + rest[rest.index("[[symbol]]"):]
    (src / "update.toml").write_text(toml.replace('name = "ticker-restart"', 'name = "ticker-plain"'))
    return src


def test_thread_main_loop_without_restart_strategy_is_refused_before_loading(guest, build, workdir, ticker):
    pkg = build(without_restart(workdir), module_dirs=(ticker,))
    before = counting(guest, 1)
    r = guest.dynamos("apply", str(pkg), check=False)
    err = r.stderr.decode()
    assert r.status != 0 and "refused, nothing was changed" in err, err
    [pid] = ticker_threads(guest)
    assert f"kernel thread dynamos_ticker (pid {pid}) runs dynamos_ticker_main as its main function" in err, err
    assert "[[kthread]]" in err, err
    assert "ticker_plain" not in guest.modules()
    after = counting(guest, 1)
    assert after["iterations"] > before["iterations"]


def test_thread_restarted_onto_new_edition_with_its_count_and_back(guest, build, ticker):
    pkg = build(LAB_UPDATES / "ticker-restart", module_dirs=(ticker,))
    [old_pid] = ticker_threads(guest)
    first = counting(guest, 1)

    applied = json.loads(guest.dynamos("apply", str(pkg), "--json").stdout)
    assert any(f"dynamos_ticker (pid {old_pid}) in dynamos_ticker_main" in n and "restarted" in n
               for n in applied["notes"]), applied["notes"]
    on_new = counting(guest, 2)
    assert on_new["iterations"] > first["iterations"]
    thread = dict(line.split(" ", 1) for line in guest.read(THREAD).splitlines())
    [new_pid] = ticker_threads(guest)
    assert thread["on"] == "new" and int(thread["pid"]) == new_pid != old_pid, thread
    assert thread["restarts"] == "1" and thread["last_error"] == "0", thread
    # The thread runs the update's code: livepatch's transition finished all the same.
    status = guest.status()["updates"][0]
    assert status["transition"] is False
    assert status["editions"][0]["thread"]["pid"] == new_pid and status["editions"][0]["thread"]["on"] == "new"

    guest.dynamos("revert", "ticker-restart")
    back = counting(guest, 1)
    assert back["iterations"] > on_new["iterations"]
    assert "ticker_restart" not in guest.modules()
    print(f"kthread restart: onto edition 2 in {int(thread['last_restart_ns']) / 1000:.0f} us, "
          f"{back['iterations']} iterations, 0 gaps", file=sys.stderr)


def test_failed_restart_leaves_the_thread_on_the_kernels_code_and_the_update_never_loaded(guest, build, ticker):
    pkg = build(LAB_UPDATES / "ticker-restart", module_dirs=(ticker,))
    before = counting(guest, 1)
    guest.sh(f"echo 1 > {PARAMS}/refuse_restart")
    try:
        r = guest.dynamos("apply", str(pkg), check=False)
    finally:
        guest.sh(f"echo 0 > {PARAMS}/refuse_restart")
    err = r.stderr.decode()
    assert r.status != 0 and "never loaded" in err, err
    assert "start hook failed" in err, err  # the kernel's log, quoted
    assert "ticker_restart" not in guest.modules()
    after = counting(guest, 1)  # the same count, carried back: no gap
    assert after["iterations"] > before["iterations"]


@pytest.fixture
def page_cache_file():
    """A 700 MiB file the guest reads through the host root share (9p with cache=loose), so the
    guest's page cache fills with clean, reclaimable pages. Sparse on the host: it costs no disk.
    In the home directory because the lab mounts tmpfs over /tmp and /var/tmp."""
    directory = Path(tempfile.mkdtemp(prefix="dynamos-reclaim-", dir=Path.home()))
    path = directory / "cache.bin"
    with open(path, "wb") as f:
        f.truncate(700 << 20)
    yield str(path)
    shutil.rmtree(directory)


def vmstat(guest: Guest) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in guest.read("/proc/vmstat").splitlines())}


def kswapd_threads(guest: Guest) -> list[int]:
    out = guest.sh("for d in /proc/[0-9]*; do case \"$(cat $d/comm 2>/dev/null)\" in kswapd*) echo ${d#/proc/};; "
                   "esac; done; true")
    return [int(p) for p in out.split()]


# Rounds of memory pressure: fill the page cache, then take 700 MiB of anonymous memory (the lab
# has 1 GiB), so kswapd must reclaim the cache for the allocation to succeed without an OOM kill.
PRESSURE = """
import subprocess, sys, time
rounds = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end or rounds < 2:
    subprocess.run(["cat", sys.argv[1]], stdout=subprocess.DEVNULL, check=True)
    hog = b"\\1" * (700 << 20)
    del hog
    rounds += 1
print(rounds)
"""


def test_kswapd_replaced_live_under_memory_pressure_keeps_reclaiming(guest, build, page_cache_file):
    pkg = build(EXAMPLES / "kswapd-restart")
    [old_pid] = kswapd_threads(guest)
    guest.sh(f"cat > /tmp/pressure.py <<'EOF'\n{PRESSURE}EOF\n"
             f"({sys.executable} /tmp/pressure.py {page_cache_file} 20 > /tmp/pressure.out 2>&1; "
             "echo $? > /tmp/pressure.rc) "
             "</dev/null >/dev/null 2>&1 &")
    try:
        time.sleep(3)  # the first round is filling the cache
        before = vmstat(guest)
        applied = json.loads(guest.dynamos("apply", str(pkg), "--json").stdout)
        assert any(f"kswapd0 (pid {old_pid}) in kswapd" in n for n in applied["notes"]), applied["notes"]
        [new_pid] = kswapd_threads(guest)
        thread = dict(line.split(" ", 1) for line in guest.read("/sys/module/kswapd_restart/dynamos/kswapd/thread")
                      .splitlines())
        assert thread["on"] == "new" and int(thread["pid"]) == new_pid != old_pid, thread
        guest.sh("while [ ! -e /tmp/pressure.rc ]; do sleep 1; done", timeout=300)
        assert guest.read("/tmp/pressure.rc").strip() == "0", guest.read("/tmp/pressure.out")
        after = vmstat(guest)
        passes = int(guest.read("/sys/module/kswapd_restart/parameters/passes"))
        reclaimed = after["pgsteal_kswapd"] - before["pgsteal_kswapd"]
        assert passes > 0, "the new kswapd edition never reclaimed"
        assert reclaimed > 0, "no page was reclaimed by kswapd after the restart"
        assert after["oom_kill"] == before["oom_kill"], "memory pressure ended in an OOM kill"
        assert kswapd_threads(guest) == [new_pid]
    finally:
        # The revert must run whatever went wrong above, or every later test finds the update loaded.
        try:
            guest.lab.run(["sh", "-c", "while [ ! -e /tmp/pressure.rc ]; do sleep 1; done; rm -f /tmp/pressure.*"],
                          timeout=300)
        finally:
            reverted = guest.lab.run([sys.executable, "-m", "dynamos", "revert", "kswapd-restart"], timeout=180,
                                     env=guest_env())
    assert reverted.status == 0 and not reverted.kernel_messages, (reverted.stderr.decode(), reverted.kernel_messages)
    [back_pid] = kswapd_threads(guest)
    assert back_pid not in (old_pid, new_pid)
    # the kernel's own kswapd, restarted at the revert, reclaims again
    start = vmstat(guest)["pgsteal_kswapd"]
    guest.run(sys.executable, "-c", PRESSURE, page_cache_file, "0", timeout=300)
    assert vmstat(guest)["pgsteal_kswapd"] > start
    print(f"kswapd restart: {passes} reclaim passes and {reclaimed} pages reclaimed by the new edition under "
          f"pressure ({int(thread['last_restart_ns']) / 1000:.0f} us to restart); no OOM kill", file=sys.stderr)


def cumulative(workdir: Path, source: Path, name: str) -> Path:
    """``source`` renamed ``name``, replacing every earlier update (a cumulative update)."""
    src = workdir / "src" / name
    shutil.copytree(source, src, dirs_exist_ok=True)
    toml = (src / "update.toml").read_text()
    old_name = toml.split('name = "', 1)[1].split('"', 1)[0]
    (src / "update.toml").write_text(toml.replace(f'name = "{old_name}"', f'name = "{name}"\nreplace = true', 1))
    return src


def test_cumulative_update_takes_the_thread_over_and_the_replaced_module_goes(guest, build, workdir, ticker):
    first = build(LAB_UPDATES / "ticker-restart", module_dirs=(ticker,))
    following = build(cumulative(workdir, LAB_UPDATES / "ticker-restart", "ticker-restart-next"), module_dirs=(ticker,))
    [pid0] = ticker_threads(guest)
    guest.dynamos("apply", str(first))
    try:
        on_first = counting(guest, 2)
        [pid1] = ticker_threads(guest)
        applied = json.loads(guest.dynamos("apply", str(following), "--json").stdout)
    except BaseException:
        guest.dynamos("revert", "ticker-restart", check=False)
        raise
    try:
        assert any(f"(pid {pid1}) runs update ticker_restart's copy" in n and "let go" in n
                   for n in applied["notes"]), applied["notes"]
        assert applied["replaced"] == ["ticker_restart"], applied
        # The replaced update let go of the thread, so its module could be unloaded.
        assert "ticker_restart" not in guest.modules()
        on_next = counting(guest, 2)  # the count went on from where the first update's thread left it
        assert on_next["iterations"] > on_first["iterations"]
        [pid2] = ticker_threads(guest)
        assert pid2 not in (pid0, pid1)
        thread = dict(line.split(" ", 1) for line in guest.read(THREAD.replace("ticker_restart", "ticker_restart_next"))
                      .splitlines())
        assert thread["on"] == "new" and int(thread["pid"]) == pid2, thread
    finally:
        guest.dynamos("revert", "ticker-restart-next")
    back = counting(guest, 1)
    assert back["iterations"] > on_next["iterations"]
    assert not {"ticker_restart", "ticker_restart_next"} & guest.modules()


def test_cumulative_update_that_would_strand_a_restarted_thread_is_refused(guest, build, workdir, ticker):
    first = build(LAB_UPDATES / "ticker-restart", module_dirs=(ticker,))
    plain = build(cumulative(workdir, without_restart(workdir), "ticker-plain-next"), module_dirs=(ticker,))
    guest.dynamos("apply", str(first))
    try:
        [pid] = ticker_threads(guest)
        r = guest.dynamos("apply", str(plain), check=False)
        err = r.stderr.decode()
        assert r.status != 0 and "refused, nothing was changed" in err, err
        assert (f"kernel thread dynamos_ticker (pid {pid}) runs update ticker_restart's copy of "
                "dynamos_ticker_main") in err, err
        assert "ticker_plain_next" not in guest.modules()
        counting(guest, 2)
    finally:
        guest.dynamos("revert", "ticker-restart")
    counting(guest, 1)
