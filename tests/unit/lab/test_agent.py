"""The guest agent's command loop, on a socket pair standing in for the virtio-serial port."""

from __future__ import annotations

import select
import socket
import threading

from dynamos.lab import agent as agent_module
from dynamos.lab import protocol as P


def _run_to_exit(monkeypatch, port_ready_always: bool) -> list[tuple[bytes, bytes]]:
    host, guest = socket.socketpair()
    guest_agent = agent_module.Agent(guest.detach())
    real_select = select.select
    if port_ready_always:
        # The virtio port reports a hang-up (readable) while the guest has not yet seen the next
        # connection open; by the time the agent reads, it is open and has nothing to read.
        def stale_hangup(rlist, wlist, xlist, timeout=None):
            ready, writable, errors = real_select(rlist, wlist, xlist, timeout)
            if guest_agent.fd in rlist and guest_agent.fd not in ready:
                ready = [guest_agent.fd, *ready]
            return ready, writable, errors
        monkeypatch.setattr(agent_module.select, "select", stale_hangup)
    host.sendall(P.encode(P.STDIN_EOF, b""))
    worker = threading.Thread(target=guest_agent.run,
                              args=(P.RunRequest(["sh", "-c", "echo 0"], "/", {}),), daemon=True)
    worker.start()
    host.settimeout(10)
    reader, frames = P.FrameReader(), []
    try:
        while not any(kind == P.EXIT for kind, _ in frames):
            data = host.recv(65536)
            assert data, "the agent closed the port"
            frames += reader.feed(data)
    finally:
        worker.join(1)
        host.close()
    return frames


def test_a_command_ends_with_its_output_and_exit_status(monkeypatch):
    frames = _run_to_exit(monkeypatch, port_ready_always=False)
    assert (P.STDOUT, b"0\n") in frames
    assert P.decode_exit(frames[-1][1])[0] == 0


def test_a_stale_hangup_of_the_port_does_not_hold_back_the_commands_end(monkeypatch):
    # Before the port was non-blocking, the agent's read waited here for the host's next frame,
    # and the host, waiting for the exit status, sent none until its timeout (seen in CI).
    frames = _run_to_exit(monkeypatch, port_ready_always=True)
    assert frames[-1][0] == P.EXIT
    assert P.decode_exit(frames[-1][1])[0] == 0
