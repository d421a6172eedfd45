"""Kernel threads that never leave their main function, on the real kernel: detected before
loading, restarted onto the new edition with their state carried over, and back on revert."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from .conftest import LAB_UPDATES, Guest, build_test_module

pytestmark = pytest.mark.lab

PARAMS = "/sys/module/dynamos_ticker/parameters"
THREAD = "/sys/module/ticker_restart/dynamos/dynamos_ticker:dynamos_ticker_main/thread"


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
    assert guest.livepatches() == []
    yield
    assert guest.livepatches() == [], "the test left a live update behind"


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
    assert guest.status()["updates"][0]["transition"] is False

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
