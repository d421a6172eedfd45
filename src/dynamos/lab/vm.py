"""QEMU lifecycle for the lab: boot a target kernel with the host's root shared read-only,
run commands through the guest agent, watch the console for oopses, shut down.

A lab is a directory (its *state dir*) holding the QEMU pid, the control socket, the console
log and ``lab.json``; a lab started with ``dynamos lab start`` outlives the command that started
it and later commands attach to it, so a test suite pays one boot, not one per test.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynamos.errors import LabError
from dynamos.lab import protocol as P
from dynamos.lab.machine import (
    LabConfig,
    lab_initramfs,
    needed_shares,
    normalise_shares,
    qemu_argv,
    qemu_binary,
)
from dynamos.lab.modules import ensure_module_index
from dynamos.target import TargetKernel, cache_root, fetch_target

# Exit statuses of `dynamos lab run` that are not the command's own (documented in README).
EXIT_KERNEL_OOPS = 123
EXIT_TIMEOUT = 124
EXIT_BOOT_FAILED = 125


# Console lines that mean the guest kernel is in trouble.  WARN and BUG splats, oopses, panics,
# lockups and RCU stalls all print one of these first.
OOPS_PATTERNS = re.compile(
    r"(Oops:|BUG: |Kernel panic|WARNING: CPU: |general protection fault|"
    r"watchdog: BUG: soft lockup|rcu: INFO: rcu_.* detected stalls|Call Trace:)"
)


@dataclass
class CommandResult:
    """What a command run in the guest produced."""

    argv: list[str]
    status: int
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False
    kernel_messages: list[str] = field(default_factory=list)  # oops/WARN lines seen meanwhile
    expected_messages: list[str] = field(default_factory=list)  # those the caller said it expected

    @property
    def oopsed(self) -> bool:
        return bool(self.kernel_messages)

    def to_json(self) -> dict:
        return {
            "argv": self.argv, "status": self.status, "seconds": self.seconds,
            "timed_out": self.timed_out, "kernel_messages": self.kernel_messages,
            "expected_messages": self.expected_messages,
            "stdout": self.stdout.decode(errors="replace"), "stderr": self.stderr.decode(errors="replace"),
        }


# QEMU 7.2's multi-threaded TCG (Debian 12's) now and then dies of SIGSEGV while a guest boots on
# a loaded host (seen here once in a few hundred boots: host dmesg "qemu-system-x86[...]: segfault
# at a0 ... in qemu-system-x86_64"); a race in QEMU fixed in later releases, not the guest's fault.
# A boot that ends that way is tried once more, saying so; a crash after boot is reported as is.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL})
BOOT_CRASH_RETRIES = 1


class QemuCrashed(LabError):
    """QEMU itself died of a fault signal."""

    def __init__(self, message: str, signum: int):
        self.signum = signum
        super().__init__(message)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class GuestCrashed(LabError):
    """The guest kernel died (panic, crash) while a command ran; the console lines say why."""

    exit_status = EXIT_KERNEL_OOPS

    def __init__(self, message: str, kernel_messages: list[str]):
        self.kernel_messages = kernel_messages
        super().__init__(message)


def labs_dir() -> Path:
    return cache_root() / "labs"


def _read_console(path: Path, offset: int) -> tuple[str, int]:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)


def kernel_trouble(text: str) -> list[str]:
    """Console lines that report an oops, BUG, WARN, panic, lockup or stall."""
    return [line.strip() for line in text.splitlines() if OOPS_PATTERNS.search(line)]


def split_expected(trouble: Sequence[str], expected: str | re.Pattern[str] | None) -> tuple[list[str], list[str]]:
    """(unexpected, expected) trouble lines: a test that provokes a warning on purpose names it
    (a regex searched in the splat's first line, e.g. ``WARNING: CPU: 0 PID: 9 at f.c:3 func+0x1``),
    and that splat's ``Call Trace:`` lines count as expected with it; anything else stays trouble."""
    if expected is None:
        return list(trouble), []
    pattern = re.compile(expected) if isinstance(expected, str) else expected
    unexpected: list[str] = []
    seen: list[str] = []
    in_expected = False
    for line in trouble:
        if "Call Trace:" in line:  # after the console's timestamp
            (seen if in_expected else unexpected).append(line)
            continue
        in_expected = bool(pattern.search(line))
        (seen if in_expected else unexpected).append(line)
    return unexpected, seen


class Lab:
    """A running lab VM, owned by this process or attached to through its state dir."""

    def __init__(self, state_dir: Path, info: dict):
        self.state_dir = state_dir
        self.info = info
        self.console_offset = info.get("console_offset", 0)

    # ----- paths and state -------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.state_dir / "ctl.sock"

    @property
    def console_path(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def kernel(self) -> str:
        return self.info["kernel"]

    def alive(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:  # our own child: poll() also reaps it
            return proc.poll() is None
        # A recycled pid would not have our socket; the state dir check is enough here.
        return _pid_alive(self.pid) and self.socket_path.exists()

    def _dies_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return False

    def console_text(self) -> str:
        return _read_console(self.console_path, 0)[0]

    # ----- boot ------------------------------------------------------------------------------
    @classmethod
    def boot(cls, config: LabConfig, state_dir: Path | None = None,
             progress: Callable[[str], None] | None = None, detach: bool = False) -> Lab:
        """Boot a lab and wait until its agent answers.  Raises LabError on boot failure."""
        say = progress or (lambda _m: None)
        target = fetch_target(config.kernel, progress=say)
        accel = config.accel or choose_accel(target, say)
        t0 = time.monotonic()
        if state_dir is None:
            state_dir = labs_dir() / f"run-{os.getpid()}-{int(time.time() * 1000)}"
        if state_dir.exists():
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True)
        shares = normalise_shares([*config.shares, *needed_shares()], config.outputs)
        ensure_module_index(target, say)
        initrd = state_dir / "initramfs.cpio"
        initrd.write_bytes(lab_initramfs(target, shares, config.root_cache, disk=config.disk is not None))
        argv = qemu_argv(target, config, accel, state_dir, initrd, shares)
        (state_dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        say(f"booting {target.release} ({accel.upper()}, {config.cpus} CPU, {config.memory_mb} MiB)")
        for attempt in range(1 + BOOT_CRASH_RETRIES):
            log = open(state_dir / "qemu.log", "wb")
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=detach)
            log.close()
            info = {"pid": proc.pid, "kernel": target.release, "accel": accel,
                    "shares": [p for p, w in shares if not w], "outputs": [p for p, w in shares if w],
                    "config": asdict(config), "started": time.time()}
            lab = cls(state_dir, info)
            lab._proc = proc
            try:
                uptime = lab._wait_ready(config.boot_timeout, proc)
                break
            except QemuCrashed as e:
                lab.kill()
                if attempt == BOOT_CRASH_RETRIES:
                    raise
                info["boot_crashes"] = attempt + 1
                say(f"QEMU crashed while booting ({e.signal_name}); booting again")
                if lab.console_path.exists():  # kept for a look at what the guest had printed
                    lab.console_path.replace(state_dir / f"console.crash{attempt + 1}.log")
            except BaseException:
                lab.kill()
                raise
        info["boot_seconds"] = round(time.monotonic() - t0, 3)
        info["guest_uptime_at_ready"] = uptime
        lab._save()
        say(f"lab up in {info['boot_seconds']:.1f} s")
        return lab

    def _wait_ready(self, timeout: float, proc: subprocess.Popen) -> float:
        """Ping the agent until it says HELLO; returns the guest's uptime then."""
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if proc.poll() is not None:
                raise self._stopped(proc, f"QEMU exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise LabError(self._boot_failure("QEMU did not create its control socket"))
            time.sleep(0.01)
        with self._connect() as conn:
            conn.settimeout(0.2)
            reader = P.FrameReader()
            last_ping = 0.0
            while True:
                now = time.monotonic()
                if proc.poll() is not None:
                    raise self._stopped(proc, f"the guest stopped (QEMU status {proc.returncode})")
                if now > deadline:
                    raise LabError(self._boot_failure(f"the guest agent did not answer within {timeout:.0f} s"))
                if now - last_ping > 1.0:
                    conn.sendall(P.encode(P.PING, b""))
                    last_ping = now
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # the guest went down: QEMU closed the channel
                    proc.wait(timeout=10)
                    raise self._stopped(proc, f"the guest stopped (QEMU status {proc.returncode})") from None
                for kind, payload in _frames(reader, data):
                    if kind == P.HELLO:
                        return _guest_data(P.decode_hello, payload)[1]

    def _stopped(self, proc: subprocess.Popen, why: str) -> LabError:
        """The error for a QEMU that ended during boot: QemuCrashed when a fault signal ended it."""
        if proc.returncode is not None and -proc.returncode in CRASH_SIGNALS:
            return QemuCrashed(self._boot_failure(f"QEMU crashed ({signal.Signals(-proc.returncode).name})"),
                               -proc.returncode)
        return LabError(self._boot_failure(why))

    def _boot_failure(self, why: str) -> str:
        console = self.console_text()
        qemu_log = (self.state_dir / "qemu.log")
        tail = "\n".join(console.splitlines()[-25:])
        extra = qemu_log.read_text(errors="replace").strip() if qemu_log.exists() else ""
        msg = f"lab boot failed: {why}"
        if extra:
            msg += f"\nQEMU said: {extra[-1500:]}"
        if tail:
            msg += f"\nlast console lines ({self.console_path}):\n{tail}"
        return msg

    def _saved_console_offset(self) -> int:
        try:
            return int(json.loads((self.state_dir / "lab.json").read_text()).get("console_offset", 0))
        except (OSError, ValueError):
            return 0

    def _save(self) -> None:
        self.info["console_offset"] = self.console_offset
        tmp = self.state_dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=2))
        tmp.rename(self.state_dir / "lab.json")

    @classmethod
    def attach(cls, state_dir: Path) -> Lab:
        try:
            info = json.loads((state_dir / "lab.json").read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {state_dir}") from None
        lab = cls(state_dir, info)
        if not lab.alive():
            raise LabError(f"the lab in {state_dir} is not running (QEMU pid {lab.pid} is gone)")
        return lab

    # ----- commands --------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.socket_path))
        return conn

    def run(self, argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None, stdin: bytes | None = None,
            on_stdout: Callable[[bytes], None] | None = None,
            on_stderr: Callable[[bytes], None] | None = None,
            expect_warning: str | re.Pattern[str] | None = None) -> CommandResult:
        """Run a command in the guest as root and wait for it; output is also streamed to the
        callbacks.  Kernel trouble printed meanwhile lands in ``kernel_messages``, except a
        splat matching ``expect_warning`` (see :func:`split_expected`): ``expected_messages``."""
        if not argv:
            raise LabError("no command given")
        cwd = cwd or os.getcwd()
        with open(self.state_dir / "run.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one command at a time per lab
            # Another process attached to this lab (an Ansible connection, a second CLI) may have
            # run commands since: the console up to its saved offset was its to judge, not ours.
            self.console_offset = max(self.console_offset, self._saved_console_offset())
            _, self.console_offset = _read_console(self.console_path, self.console_offset) \
                if self.console_offset == 0 else ("", self.console_offset)
            start_offset = self.console_offset
            try:
                result = self._run_locked(list(argv), cwd, env or {}, timeout, stdin, on_stdout, on_stderr)
            except (LabError, OSError) as e:
                if not self._dies_within(3.0):  # a panicking guest takes a moment to power off
                    raise
                text, _ = _read_console(self.console_path, start_offset)
                trouble = kernel_trouble(text)
                lines = "\n".join(f"  {line}" for line in (trouble or text.splitlines()[-10:]))
                raise GuestCrashed(f"the guest kernel died while running {argv[0]} "
                                   f"(console: {self.console_path}):\n{lines}", trouble) from e
            text, self.console_offset = _read_console(self.console_path, start_offset)
            result.kernel_messages, result.expected_messages = split_expected(kernel_trouble(text), expect_warning)
            self._save()
        return result

    def _run_locked(self, argv, cwd, env, timeout, stdin, on_stdout, on_stderr) -> CommandResult:
        t0 = time.monotonic()
        out, err = bytearray(), bytearray()
        reader = P.FrameReader()
        timed_out = False
        with self._connect() as conn:
            conn.sendall(P.RunRequest(argv, cwd, env).encode())
            for at in range(0, len(stdin or b""), P.MAX_PAYLOAD):
                conn.sendall(P.encode(P.STDIN, stdin[at:at + P.MAX_PAYLOAD]))
            conn.sendall(P.encode(P.STDIN_EOF, b""))
            conn.settimeout(0.5)
            deadline = None if timeout is None else t0 + timeout
            kill_sent = None
            while True:
                if not self.alive():
                    raise LabError("the lab VM went away while running the command")
                if deadline is not None and time.monotonic() > deadline and kill_sent is None:
                    conn.sendall(P.encode_signal(int(signal.SIGKILL)))
                    kill_sent = time.monotonic()
                    timed_out = True
                if kill_sent is not None and time.monotonic() - kill_sent > 10:
                    raise LabError(f"command {argv[0]} did not die after SIGKILL (guest hung?)")
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    raise LabError("the lab closed the command channel")
                for kind, payload in _frames(reader, data):
                    if kind == P.STDOUT:
                        out += payload
                        if on_stdout:
                            on_stdout(payload)
                    elif kind == P.STDERR:
                        err += payload
                        if on_stderr:
                            on_stderr(payload)
                    elif kind == P.START_FAILED:
                        raise LabError(f"the guest could not start {argv[0]}: {payload.decode(errors='replace')}")
                    elif kind == P.EXIT:
                        status = EXIT_TIMEOUT if timed_out else _guest_data(P.decode_exit, payload)[0]
                        return CommandResult(argv, status, bytes(out), bytes(err),
                                             round(time.monotonic() - t0, 6), timed_out)

    def interactive(self, argv: Sequence[str]) -> int:
        """Run a command on a guest pty wired to this terminal (``dynamos lab shell``)."""
        import termios
        import tty

        fd_in = sys.stdin.fileno()
        size = shutil.get_terminal_size()
        with open(self.state_dir / "run.lock", "w") as lock, self._connect() as conn:
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn.sendall(P.RunRequest(list(argv), os.getcwd(), {"TERM": os.environ.get("TERM", "linux")},
                                      pty=True, winsize=(size.lines, size.columns)).encode())
            old = termios.tcgetattr(fd_in) if os.isatty(fd_in) else None
            if old:
                tty.setraw(fd_in)
            reader = P.FrameReader()
            try:
                import select
                while True:
                    ready, _, _ = select.select([conn, fd_in], [], [], 0.5)
                    if fd_in in ready:
                        data = os.read(fd_in, 4096)
                        conn.sendall(P.encode(P.STDIN, data) if data else P.encode(P.STDIN_EOF, b""))
                    if conn in ready:
                        data = conn.recv(65536)
                        if not data:
                            return EXIT_BOOT_FAILED
                        for kind, payload in _frames(reader, data):
                            if kind in (P.STDOUT, P.STDERR):
                                os.write(sys.stdout.fileno(), payload)
                            elif kind == P.EXIT:
                                return _guest_data(P.decode_exit, payload)[0]
            finally:
                if old:
                    termios.tcsetattr(fd_in, termios.TCSADRAIN, old)

    # ----- shutdown --------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Power the guest off cleanly, make sure QEMU is gone, and discard the state dir."""
        if self.alive():
            try:
                self.run(["/bin/sh", "-c", "sync; poweroff -f"], timeout=timeout)
            except LabError:
                pass
        self.kill(timeout)
        self.discard()

    def discard(self) -> None:
        """Remove the state dir of a lab that is gone, keeping its console log as
        ``labs/last-console.log`` for a look after the fact."""
        try:
            shutil.copyfile(self.console_path, labs_dir() / "last-console.log")
        except OSError:
            pass
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def kill(self, timeout: float = 5.0) -> None:
        proc = getattr(self, "_proc", None)
        deadline = time.monotonic() + timeout
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            while time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    break
                if proc is None and not _pid_alive(self.pid):
                    break
                time.sleep(0.02)
            else:
                deadline = time.monotonic() + timeout
                continue
            break
        if proc is not None:
            proc.wait()
        self.socket_path.unlink(missing_ok=True)


def _frames(reader: P.FrameReader, data: bytes) -> list[tuple[bytes, bytes]]:
    """Frames from the guest; one that breaks the protocol ends the command as a lab failure."""
    try:
        return reader.feed(data)
    except P.FrameError as e:
        raise LabError(f"the guest broke the command protocol: {e}") from None


def _guest_data(decode: Callable[[bytes], tuple], payload: bytes) -> tuple:
    try:
        return decode(payload)
    except P.FrameError as e:
        raise LabError(f"the guest broke the command protocol: {e}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of someone else still answers kill(0); look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----- accelerator choice -------------------------------------------------------------------------
def _accel_cache_key() -> str:
    try:
        qemu_version = subprocess.run([qemu_binary(), "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        qemu_version = "?"
    return f"{os.uname().release}|{qemu_version}"


KVM_PROBE_DEADLINE = 15.0


def choose_accel(target: TargetKernel, progress: Callable[[str], None] | None = None) -> str:
    """KVM only when a KVM guest is proven to boot and answer within a short deadline.

    ``/dev/kvm`` existing proves nothing: under nested virtualisation it opens, yet guests hang
    or crawl.  The verdict is cached per host kernel and QEMU version; ``DYNAMOS_ACCEL``
    overrides it.
    """
    forced = os.environ.get("DYNAMOS_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise LabError(f"DYNAMOS_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return forced
    say = progress or (lambda _m: None)
    verdict_file = cache_root() / "accel.json"
    key = _accel_cache_key()
    try:
        cached = json.loads(verdict_file.read_text())
        if cached.get("key") == key:
            return cached["accel"]
    except (FileNotFoundError, ValueError):
        pass
    accel, why = "tcg", "no usable /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError:
        pass
    else:
        say(f"probing KVM (a test boot must answer within {KVM_PROBE_DEADLINE:.0f} s)")
        t0 = time.monotonic()
        try:
            lab = Lab.boot(LabConfig(kernel=target.release, accel="kvm", cpus=1, memory_mb=512,
                                     boot_timeout=KVM_PROBE_DEADLINE))
            try:
                r = lab.run(["/bin/true"], timeout=5)
                ok = r.status == 0
            finally:
                lab.kill()
                shutil.rmtree(lab.state_dir, ignore_errors=True)
            accel, why = ("kvm", f"KVM guest answered in {time.monotonic() - t0:.1f} s") if ok \
                else ("tcg", "KVM guest failed to run a command")
        except LabError as e:
            why = f"KVM guest did not boot in time ({str(e).splitlines()[0]})"
    say(f"accelerator: {accel} ({why})")
    verdict_file.parent.mkdir(parents=True, exist_ok=True)
    verdict_file.write_text(json.dumps({"key": key, "accel": accel, "why": why, "at": time.time()}))
    return accel
