"""Pure parts of the lab: frame codec, initramfs writer, module order, oops patterns, shares."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dynamos.errors import LabError, TargetError
from dynamos.lab import protocol as P
from dynamos.lab.initramfs import CpioWriter, cached_initramfs, files_cpio, find_busybox, module_load_order
from dynamos.lab.machine import LabConfig, normalise_shares, qemu_argv
from dynamos.lab.vm import kernel_trouble
from dynamos.target import fetch_target, validate_release
from dynamos.target.fetch import _packages_for


def test_frames_survive_arbitrary_splits():
    stream = P.encode(P.STDOUT, b"hello") + P.encode_exit(3, 0, 1.5) + P.encode(P.STDERR, b"")
    for cut in range(len(stream) + 1):
        r = P.FrameReader()
        frames = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert [k for k, _ in frames] == [P.STDOUT, P.EXIT, P.STDERR]
        assert frames[0][1] == b"hello" and frames[2][1] == b""
        assert P.decode_exit(frames[1][1]) == (3, 0, 1.5)


def test_a_run_request_round_trips_as_data():
    req = P.RunRequest(["sh", "-c", "echo ü; exit 3"], "/tmp/a,b", {"A": "1=2", "EMPTY": ""}, pty=True,
                       winsize=(40, 120))
    [(kind, payload)] = P.FrameReader().feed(req.encode())
    back = P.RunRequest.decode(payload)
    assert kind == P.RUN
    assert (back.argv, back.cwd, back.env, back.pty, back.winsize) == (req.argv, req.cwd, req.env, True, (40, 120))
    assert P.decode_hello(P.FrameReader().feed(P.encode_hello("6.1.0-56-amd64", 2.5))[0][1]) == ("6.1.0-56-amd64", 2.5)


def test_an_oversized_frame_is_refused_before_it_is_buffered():
    reader = P.FrameReader(max_payload=1024)
    with pytest.raises(P.FrameError, match="announces 1025 bytes"):
        reader.feed(P.HEADER.pack(P.STDOUT, 1025))  # the header alone: nothing of the payload is waited for
    with pytest.raises(P.FrameError):
        P.encode(P.STDOUT, bytes(P.MAX_PAYLOAD + 1))


@pytest.mark.parametrize("payload", [b"", b"\x00\x00", bytes(5) + b"\xff\xff\xff\xff",
                                     P.RunRequest(["x"], "/", {}).encode()[P.HEADER.size:] + b"junk"])
def test_malformed_run_requests_are_refused(payload: bytes):
    with pytest.raises(P.FrameError):
        P.RunRequest.decode(payload)


@pytest.mark.parametrize("decode,payload", [(P.decode_exit, b"\x00" * 3), (P.decode_exit, b"\x00" * 17),
                                            (P.decode_hello, b"\x00"), (P.decode_signal, b"")])
def test_malformed_guest_frames_are_refused(decode, payload: bytes):
    with pytest.raises(P.FrameError):
        decode(payload)


def test_cpio_lists_what_was_written(tmp_path: Path):
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "busybox")
    archive = tmp_path / "a.cpio"
    archive.write_bytes(w.finish())
    assert len(archive.read_bytes()) % 512 == 0
    listing = subprocess.run([str(find_busybox()), "cpio", "-t"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["bin", "bin/hello", "bin/sh"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([str(find_busybox()), "cpio", "-i", "-d"], stdin=archive.open("rb"), cwd=out, check=True,
                   capture_output=True)
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin/sh").is_symlink() and (out / "bin/hello").stat().st_mode & 0o777 == 0o755


def test_lab_modules_come_in_dependency_order(target):
    names = [p.name.removesuffix(".ko") for p in module_load_order(target)]
    for needed in ("virtio_pci", "virtio_console", "9pnet_virtio", "9p"):
        assert needed in names
    for before, after in (("virtio", "virtio_pci"), ("9pnet", "9pnet_virtio"), ("9pnet", "9p"),
                          ("netfs", "9p"), ("virtio_ring", "virtio_console")):
        assert names.index(before) < names.index(after), names


def _cpio_list(data: bytes) -> list[str]:
    return subprocess.run([str(find_busybox()), "cpio", "-t"], input=data, capture_output=True,
                          check=True).stdout.decode().split()


def test_initramfs_carries_init_and_modules_and_is_cached(tmp_path: Path, target):
    base = cached_initramfs(target, "#!/bin/sh\n", tmp_path / "cache")
    listing = _cpio_list(base.read_bytes())
    assert {"init", "bin/busybox", "bin/insmod", "lib/modules/order"} <= set(listing)
    assert any(name.endswith("-9p.ko") for name in listing)
    assert cached_initramfs(target, "#!/bin/sh\n", tmp_path / "cache") == base  # built once
    assert cached_initramfs(target, "#!/bin/sh\necho\n", tmp_path / "cache") != base  # per init script
    assert _cpio_list(files_cpio({"lab.conf": b"X=1\n"})) == ["lab.conf"]


@pytest.mark.parametrize("line", [
    "[   12.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "[    3.0] WARNING: CPU: 1 PID: 77 at kernel/livepatch/core.c:10 klp_x+0x1/0x2",
    "[    9.9] Kernel panic - not syncing: sysrq triggered crash",
    "[    1.0] Oops: 0002 [#1] PREEMPT SMP NOPTI",
    "[    5.5] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
])
def test_kernel_trouble_is_recognised(line):
    assert kernel_trouble(f"[    0.1] fine\n{line}\n[    0.2] fine too\n") == [line]


def test_ordinary_boot_lines_are_not_trouble():
    text = ("[    0.7] mtrr: your CPUs had inconsistent fixed MTRR settings\n"
            "[    2.2] dynamos-lab: agent starting\n[    3.0] livepatch: enabling patch 'x'\n")
    assert kernel_trouble(text) == []


def test_shares_are_normalised(tmp_path: Path):
    for d in ("a/b", "c", "o/deeper"):
        (tmp_path / d).mkdir(parents=True)
    shares = [str(tmp_path / "a/b"), str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "o"), "/"]
    outputs = [str(tmp_path / "c"), str(tmp_path / "a/b"), str(tmp_path / "o/deeper")]
    assert normalise_shares(shares, outputs) == [
        (str(tmp_path / "a"), False), (str(tmp_path / "a/b"), True),  # an output mounted over a read-only share
        (str(tmp_path / "c"), True),  # shared and an output: writable
        (str(tmp_path / "o"), False), (str(tmp_path / "o/deeper"), True)]
    with pytest.raises(LabError, match="not a directory"):
        normalise_shares([str(tmp_path / "missing")])
    (tmp_path / "with space").mkdir()
    with pytest.raises(LabError, match="whitespace"):
        normalise_shares([str(tmp_path / "with space")])
    with pytest.raises(LabError, match="host root cannot be an output"):
        normalise_shares([], ["/"])


def test_qemu_options_keep_a_comma_in_a_path_inside_its_value(tmp_path: Path, target):
    odd = tmp_path / "a,readonly=off,b"
    odd.mkdir()
    argv = qemu_argv(target, LabConfig(), "tcg", tmp_path, tmp_path / "initrd",
                      normalise_shares([str(odd)], [str(tmp_path)]))
    fsdevs = {a.split(",")[1]: a for a in (argv[i + 1] for i, a in enumerate(argv) if a == "-fsdev")}
    assert fsdevs["id=share0"] == f"local,id=share0,path={tmp_path},security_model=mapped-xattr,multidevs=remap"
    assert fsdevs["id=share1"] == (f"local,id=share1,path={tmp_path}/a,,readonly=off,,b,security_model=none,"
                                   "readonly=on,multidevs=remap")
    assert fsdevs["id=hostroot"].startswith("local,id=hostroot,path=/,security_model=none,readonly=on")


def test_release_names_and_packages():
    assert validate_release("6.1.0-56-amd64") == "6.1.0-56-amd64"
    with pytest.raises(TargetError, match="does not look like a Debian kernel release"):
        validate_release("6.1")
    assert _packages_for("6.1.0-56-amd64") == [
        "linux-image-6.1.0-56-amd64", "linux-headers-6.1.0-56-amd64",
        "linux-headers-6.1.0-56-common", "linux-kbuild-6.1"]


def test_unknown_release_fails_clearly(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DYNAMOS_CACHE", str(tmp_path))
    with pytest.raises(TargetError, match="cannot download kernel 6.1.0-999-amd64"):
        fetch_target("6.1.0-999-amd64")


def test_a_qemu_that_crashes_while_booting_is_booted_once_more(tmp_path: Path, target, monkeypatch):
    """QEMU 7.2's multi-threaded TCG sometimes dies of SIGSEGV during a boot: the lab boots again
    once and says so; a second crash, or any other failure, is the error it is."""
    from dynamos.lab import vm
    from dynamos.lab.machine import LabConfig

    marker = tmp_path / "crashed-once"
    fake = tmp_path / "qemu.sh"
    fake.write_text(f"#!/bin/sh\nif [ ! -e {marker} ]; then touch {marker}; kill -SEGV $$; fi\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(vm, "qemu_argv", lambda *a, **k: [str(fake)])
    monkeypatch.setattr(vm, "lab_initramfs", lambda *a, **k: b"")
    monkeypatch.setattr(vm, "ensure_module_index", lambda *a, **k: None)
    said: list[str] = []
    with pytest.raises(vm.LabError) as info:
        vm.Lab.boot(LabConfig(kernel=target.release, accel="tcg", boot_timeout=10), tmp_path / "lab",
                    progress=said.append)
    assert not isinstance(info.value, vm.QemuCrashed) and "QEMU exited with status 3" in str(info.value)
    assert any("QEMU crashed while booting (SIGSEGV); booting again" in s for s in said)
    marker.unlink()
    monkeypatch.setattr(vm, "BOOT_CRASH_RETRIES", 0)
    with pytest.raises(vm.QemuCrashed, match="QEMU crashed \\(SIGSEGV\\)"):
        vm.Lab.boot(LabConfig(kernel=target.release, accel="tcg", boot_timeout=10), tmp_path / "lab2")
