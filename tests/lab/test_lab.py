"""The lab itself: command channel, exit statuses, shares, oops detection, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynamos.lab import EXIT_KERNEL_OOPS, EXIT_TIMEOUT
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root

from .conftest import REPO

pytestmark = pytest.mark.lab


def test_command_channel_separates_streams_and_status(lab):
    r = lab.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (r.status, r.stdout, r.stderr) == (7, b"out\n", b"err\n")


def test_back_to_back_commands_each_end_as_soon_as_they_finish(lab):
    """Every command is a new connection to the port: the guest may still be handling the last
    one's hang-up when the next one starts. Twice in CI a command's end was then held back until
    its timeout; a quick command must never come near one."""
    slow = []
    for n in range(60):
        r = lab.run(["cat", "/proc/sys/kernel/osrelease"], timeout=20)
        assert r.status == 0 and not r.timed_out, (n, r)
        if r.seconds > 10:
            slow.append((n, r.seconds))
    assert not slow, f"commands that took over 10 s: {slow}"


def test_guest_runs_the_target_kernel_and_sees_shared_dirs(lab, workdir):
    marker = workdir / "marker.txt"
    marker.write_text("from the host\n")
    r = lab.run(["sh", "-c", f"uname -r; cat {marker}; echo guest > {workdir}/back.txt; id -u"],
                cwd=str(REPO), timeout=30)
    assert r.stdout.decode().split("\n")[:3] == [DEFAULT_LAB_KERNEL, "from the host", "0"]
    assert (workdir / "back.txt").read_text() == "guest\n"


def test_the_guest_writes_only_its_outputs(lab, workdir):
    """The checkout and the cache are read-only in the guest; an output is writable, and a mode
    the guest sets there stays the guest's (mapped into xattrs): no setuid file lands on the host."""
    r = lab.run(["sh", "-c", f"touch {REPO}/guest-was-here; echo $?; touch {cache_root()}/guest-was-here; echo $?; "
                 f"cp /bin/true {workdir}/suid && chmod 4755 {workdir}/suid && ls -l {workdir}/suid"], timeout=30)
    lines = r.stdout.decode().splitlines()
    assert lines[:2] == ["1", "1"] and b"Read-only file system" in r.stderr, r
    assert lines[2].startswith("-rwsr-xr-x"), lines  # what the guest sees
    assert not (REPO / "guest-was-here").exists() and not (cache_root() / "guest-was-here").exists()
    assert not (workdir / "suid").stat().st_mode & 0o6000  # what the host has


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


def test_modprobe_loads_the_targets_modules_with_their_dependencies(guest, target):
    """The guest's /lib/modules/<release> is the target's (the cache's tree, indexed on the host):
    modprobe resolves dependencies and removes them again as on a host running that kernel."""
    deps = set(guest.sh("modinfo -F depends nfsd").strip().split(","))
    assert deps >= {"sunrpc", "lockd", "auth_rpcgss"}, deps
    before = guest.modules()
    guest.run("modprobe", "nfsd")
    assert guest.modules() - before == {"nfsd", *deps} - before
    guest.run("modprobe", "-r", "nfsd")
    left = guest.modules() - before
    assert "nfsd" not in left and not left & {"lockd", "auth_rpcgss", "nfs_acl"}, left
    # kmod skips a dependency it finds still in use while it unwinds (here sunrpc and grace,
    # seen so with this kernel): named, they go too.
    if left:
        guest.run("modprobe", "-r", *sorted(left))
    assert guest.modules() == before


def test_the_guest_writes_its_modules_tree_in_memory_only(guest, target):
    """Writable on top (a test adds modules and runs depmod), the host's cache untouched."""
    mark = f"/lib/modules/{target.release}/kernel/guest-was-here"
    assert guest.sh(f"echo guest > {mark}; cat {mark}; rm {mark}; ls {mark} 2>/dev/null; echo $?") == "guest\n2\n"
    assert not (target.modules_dir / "kernel" / "guest-was-here").exists()


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


def _pty_session(argv: list[str], typed: bytes, timeout: float = 240) -> tuple[int, bytes]:
    """Run argv on a pseudo-terminal, type into it, return (exit status, everything it printed)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        os.environ["PYTHONPATH"] = str(REPO / "src")
        os.chdir(REPO)
        os.execv(argv[0], argv)
    out = bytearray()
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        if not sent and b"#" in out:  # the guest shell's prompt
            os.write(fd, typed)
            sent = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), bytes(out)


def test_cli_named_lab_lifecycle_and_shell():
    name = f"pytest-cli-{os.getpid()}"
    r = _cli("lab", "start", "--name", name, "--json")
    assert r.returncode == 0, r.stderr
    try:
        started = json.loads(r.stdout)
        assert started["kernel"] == DEFAULT_LAB_KERNEL and started["boot_seconds"] > 0
        labs = json.loads(_cli("lab", "status", "--json").stdout)["labs"]
        assert name in [lab["name"] for lab in labs]
        # Two runs in the same lab: state written by the first is seen by the second (no reboot).
        assert _cli("lab", "run", "-q", "--name", name, "--", "sh", "-c", "echo 1 > /run/mark").returncode == 0
        r = _cli("lab", "run", "-q", "--name", name, "--", "cat", "/run/mark")
        assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
        status, out = _pty_session([sys.executable, "-m", "dynamos", "lab", "shell", "--name", name],
                                   b"cat /run/mark; uname -r; exit 5\n")
        assert status == 5, out
        assert DEFAULT_LAB_KERNEL.encode() in out
    finally:
        r = _cli("lab", "stop", "--name", name)
    assert "stopped" in r.stdout
    labs = json.loads(_cli("lab", "status", "--json").stdout)["labs"]
    assert name not in [lab["name"] for lab in labs]
