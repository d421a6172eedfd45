"""Guest agent: runs inside the lab VM as root and executes commands sent by the host.

Started by the lab's init with ``python -S -E <this file>``; it uses only the standard library
and ``protocol.py`` beside it.  One command runs at a time; its stdout, stderr and exit status
go back as separate frames, so the host never scrapes the console.
"""

from __future__ import annotations

# Imports are few and cheap on purpose: every boot pays for them under TCG over 9p.
import fcntl
import os
import select
import signal
import struct
import sys
import termios
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
HOST_GONE_AFTER = 5.0  # seconds of a closed host side before a running command is killed
import protocol as P  # noqa: E402

PORT_NAME = "dynamos.ctl"
PORTS = "/sys/class/virtio-ports"


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def find_port() -> str:
    for port in os.listdir(PORTS):
        if read_text(f"{PORTS}/{port}/name").strip() == PORT_NAME:
            return f"/dev/{port}"
    raise SystemExit(f"virtio-serial port {PORT_NAME} not found")


class Agent:
    def __init__(self, port_fd: int):
        # Non-blocking on purpose: the port reports a hang-up while the guest still thinks the
        # previous connection is closed, and by the time we read, the next connection may be open
        # with nothing to read yet. A blocking read would then wait for the host's next frame,
        # which never comes while a command runs: the command's end would be held back.
        os.set_blocking(port_fd, False)
        self.fd = port_fd
        self.reader = P.FrameReader()

    def send(self, frame: bytes) -> None:
        P.write_all(self.fd, frame)

    def read_frames(self, timeout: float | None) -> list[tuple[bytes, bytes]] | None:
        """Frames from the host; None when the host is not connected (hang-up)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        events = poller.poll(None if timeout is None else int(timeout * 1000))
        if not events:
            return []
        if events[0][1] & select.POLLHUP and not events[0][1] & select.POLLIN:
            return None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:  # the hang-up was stale: a new connection, no frame yet
            return []
        if not data:
            return None
        return self.reader.feed(data)

    def serve(self) -> None:
        """Answer host frames forever; the agent writes only in reply, so a host that is not
        connected never blocks it."""
        while True:
            frames = self.read_frames(1.0)
            if frames is None:
                time.sleep(0.05)
                continue
            for at, (kind, payload) in enumerate(frames):
                if kind == P.PING:
                    uptime = float(read_text("/proc/uptime").split()[0])
                    self.send(P.encode_hello(os.uname().release, uptime))
                elif kind == P.RUN:
                    try:
                        req = P.RunRequest.decode(payload)
                    except P.FrameError as e:
                        self.send(P.encode(P.START_FAILED, str(e).encode()))
                        continue
                    # Frames the host sent right behind the request (stdin, its end) may have
                    # come in the same read: they are the command's, hand them over.
                    self.run(req, frames[at + 1:])
                    break

    def run(self, req: P.RunRequest, pending: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()) -> None:
        started = time.monotonic()
        env = dict(os.environ)
        env.update(req.env)
        use_pty = req.pty
        try:
            if use_pty:
                master, slave = os.openpty()
                if req.winsize != (0, 0):
                    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *req.winsize, 0, 0))
                out_r, err_r, in_w = master, None, master
                child_fds = (slave, slave, slave)
            else:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                child_fds = (in_r, out_w, err_w)
            pid = os.fork()
        except OSError as e:
            self.send(P.encode(P.START_FAILED, str(e).encode()))
            return
        if pid == 0:  # child
            try:
                os.setsid()
                for target, fd in enumerate(child_fds):
                    os.dup2(fd, target)
                if use_pty:
                    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                os.closerange(3, 4096)
                os.chdir(req.cwd or "/")
                os.execvpe(req.argv[0], req.argv, env)
            except BaseException as e:  # noqa: BLE001 - report any exec failure to the host
                os.write(2, f"dynamos-agent: cannot run {req.argv[0]!r}: {e}\n".encode())
            os._exit(127)
        for fd in set(child_fds):
            os.close(fd)
        streams = {out_r: P.STDOUT}
        if err_r is not None:
            streams[err_r] = P.STDERR
        stdin_open = True
        status: int | None = None
        hung_up_since: float | None = None
        killed = False
        def handle(kind: bytes, payload: bytes) -> None:
            nonlocal stdin_open
            if kind == P.STDIN and stdin_open:
                try:
                    P.write_all(in_w, payload)
                except OSError:
                    pass
            elif kind == P.STDIN_EOF and stdin_open and not use_pty:
                os.close(in_w)
                stdin_open = False
            elif kind == P.SIGNAL:
                try:
                    os.killpg(pid, P.decode_signal(payload))
                except ProcessLookupError:
                    pass
            elif kind == P.RESIZE and use_pty:
                rows, cols = P.decode_resize(payload)
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        for kind, payload in pending:
            handle(kind, payload)
        # The child's exit wakes the loop: it closes its output a moment before it can be
        # waited for, and polling for that moment cost every command up to one select timeout.
        exited = _exit_watch(pid)
        while streams or status is None:
            rlist = [self.fd, *streams]
            if exited is not None and status is None:
                rlist.append(exited)
            ready, _, _ = select.select(rlist, [], [], 0.2)
            for fd in ready:
                if fd == exited:
                    continue  # waited for below
                if fd == self.fd:
                    try:
                        data = os.read(self.fd, 65536)
                    except BlockingIOError:  # a stale hang-up, see __init__
                        continue
                    if not data:
                        # The host side of the port is closed: a host that went away, or the
                        # previous command's connection closing just as this one started. Only
                        # a hang-up that lasts stops the command (it must not run unattended).
                        now = time.monotonic()
                        if hung_up_since is None:
                            hung_up_since = now
                        elif now - hung_up_since > HOST_GONE_AFTER and not killed:
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                            killed = True
                        time.sleep(0.05)
                        continue
                    hung_up_since = None
                    for kind, payload in self.reader.feed(data):
                        handle(kind, payload)
                else:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:  # EIO on a pty whose slave side closed
                        data = b""
                    if data:
                        self.send(P.encode(streams[fd], data))
                    else:
                        del streams[fd]
                        if fd != in_w:
                            os.close(fd)
            if status is None:
                wpid, wstatus = os.waitpid(pid, os.WNOHANG)
                if wpid == pid:
                    status = wstatus
                    if use_pty:
                        # Drain what is left, then stop: the pty has no EOF of its own.
                        self._drain(streams)
                        streams.clear()
        if exited is not None:
            os.close(exited)
        if stdin_open and not use_pty:
            os.close(in_w)
        if use_pty:
            os.close(master)
        code = os.waitstatus_to_exitcode(status)
        self.send(P.encode_exit(code if code >= 0 else 128 - code, -code if code < 0 else 0,
                                round(time.monotonic() - started, 6)))

    def _drain(self, streams: dict[int, bytes]) -> None:
        for fd, kind in streams.items():
            while select.select([fd], [], [], 0)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self.send(P.encode(kind, data))


def _exit_watch(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (a pidfd), or None without one."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def main() -> None:
    # Orphans of commands are reaped by PID 1, the init shell, which waits for any child.
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ.setdefault("HOME", "/root")
    os.environ.setdefault("TERM", "linux")
    Agent(os.open(find_port(), os.O_RDWR)).serve()


if __name__ == "__main__":
    main()
