"""The lab itself: command channel, exit statuses, shares, oops detection, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dynamos.lab import EXIT_KERNEL_OOPS, EXIT_TIMEOUT
from dynamos.target import DEFAULT_LAB_KERNEL

from .conftest import REPO

pytestmark = pytest.mark.lab


def test_command_channel_separates_streams_and_status(lab):
    r = lab.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (r.status, r.stdout, r.stderr) == (7, b"out\n", b"err\n")


def test_guest_runs_the_target_kernel_and_sees_shared_dirs(lab, workdir):
    marker = workdir / "marker.txt"
    marker.write_text("from the host\n")
    r = lab.run(["sh", "-c", f"uname -r; cat {marker}; echo guest > {workdir}/back.txt; id -u"],
                cwd=str(REPO), timeout=30)
    assert r.stdout.decode().split("\n")[:3] == [DEFAULT_LAB_KERNEL, "from the host", "0"]
    assert (workdir / "back.txt").read_text() == "guest\n"


def test_stdin_and_large_output(lab):
    r = lab.run(["sh", "-c", "wc -c; head -c 300000 /dev/zero"], stdin=b"x" * 100000, timeout=60)
    out = r.stdout
    assert out.startswith(b"100000\n") and len(out) == len(b"100000\n") + 300000


def test_command_timeout_kills_the_command(lab):
    r = lab.run(["sleep", "30"], timeout=1)
    assert r.timed_out and r.status == EXIT_TIMEOUT
    assert lab.run(["true"], timeout=10).status == 0  # the lab is still usable


def test_kernel_warning_is_detected(lab):
    # sysrq 'l' dumps every CPU's stack: a harmless way to make the kernel print a call trace.
    r = lab.run(["sh", "-c", "echo l > /proc/sysrq-trigger; sleep 0.5"], timeout=30)
    assert r.kernel_messages, "the call trace on the console was not noticed"
    assert lab.run(["true"], timeout=10).kernel_messages == []


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "dynamos", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_lab_run_exit_status_and_oops(tmp_path):
    """One throwaway lab per call: the command's status comes back; a crash is reported distinctly."""
    r = _cli("lab", "run", "-q", "--", "sh", "-c", "cat /proc/sys/kernel/osrelease; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == DEFAULT_LAB_KERNEL
    r = _cli("lab", "run", "-q", "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert r.returncode == EXIT_KERNEL_OOPS, r.stderr
    assert "sysrq" in r.stderr.lower() or "panic" in r.stderr.lower(), r.stderr
