"""The UEFI lab's firmware side without booting: settings checked, OVMF's variable store made with
the certificates in db (by the real virt-fw-vars on Debian's real store), cached, and QEMU's options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamos.errors import LabError
from dynamos.lab import firmware
from dynamos.lab.machine import LabConfig, qemu_argv
from dynamos.target.fetch import TargetKernel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DYNAMOS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_cert(path: Path, cn: str) -> Path:
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", f"/CN={cn}", "-keyout", str(path.with_suffix(".key")),
                    "-out", str(path)],
                   check=True, capture_output=True)
    return path


def der(cert: Path) -> bytes:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True,
                          capture_output=True).stdout


def test_settings_are_checked(tmp_path: Path):
    with pytest.raises(LabError, match="firmware must be one of pvh, uefi"):
        LabConfig(firmware="bios").check()
    with pytest.raises(LabError, match="need the UEFI firmware"):
        LabConfig(db_certs=["cert.pem"]).check()
    LabConfig(firmware="uefi", db_certs=["cert.pem"]).check()


def test_missing_tools_name_what_to_install(tmp_path: Path, monkeypatch):
    with pytest.raises(LabError, match=r"OVMF_VARS_4M.fd not found: install the ovmf package"):
        firmware.enrolled_vars([], ovmf_dir=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    with pytest.raises(LabError, match=r"virt-fw-vars not found: install the virt-firmware package"):
        firmware.virt_fw_vars()


def test_the_store_holds_the_certificates_and_is_cached(tmp_path: Path, cache: Path, monkeypatch):
    one, two = make_cert(tmp_path / "one.pem", "one"), make_cert(tmp_path / "two.pem", "two")
    store = firmware.enrolled_vars([str(one), str(two)])
    assert store.parent == cache / "uefi"
    template = (firmware.OVMF_DIR / firmware.OVMF_VARS).read_bytes()
    data = store.read_bytes()
    assert len(data) == len(template) and data != template
    assert der(one) in data and der(two) in data  # db's signature lists hold each certificate's DER

    with pytest.MonkeyPatch.context() as mp:  # a hit runs no virt-fw-vars: none is to be found now
        mp.setenv("PATH", str(tmp_path))
        mp.setattr(sys, "executable", str(tmp_path / "python3"))
        assert firmware.enrolled_vars([str(one), str(two)]) == store
    only_one = firmware.enrolled_vars([str(one)])
    assert only_one != store and der(two) not in only_one.read_bytes()

    monkeypatch.setattr(firmware, "KEEP_STORES", 2)
    os.utime(store, (1, 1))
    os.utime(only_one, (1, 1))
    assert firmware.enrolled_vars([str(one), str(two)]) == store  # used again: kept over only_one
    make_cert(one, "one again")
    changed = firmware.enrolled_vars([str(one), str(two)])
    assert changed != store  # a changed certificate file is not a stale hit
    assert sorted((cache / "uefi").glob("vars-*.fd")) == sorted([store, changed])  # the least used went
    with pytest.raises(LabError, match="cannot read db certificate"):
        firmware.enrolled_vars([str(tmp_path / "missing.pem")])


def test_a_bad_certificate_fails_clearly(tmp_path: Path, cache: Path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(LabError, match="virt-fw-vars could not enroll"):
        firmware.enrolled_vars([str(bad)])
    assert not list((cache / "uefi").glob("*"))  # no half-made store left to be taken as cached


def test_qemu_boots_the_bzimage_under_ovmf_with_its_own_store(tmp_path: Path, cache: Path):
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"MZ")
    target = TargetKernel("6.1.0-56-amd64", tmp_path, None, image, None)
    cert = make_cert(tmp_path / "db.pem", "db")
    state = tmp_path / "state"
    state.mkdir()
    config = LabConfig(firmware="uefi", db_certs=[str(cert)], append=" module.sig_enforce=1 ")
    argv = qemu_argv(target, config, "tcg", state, tmp_path / "initrd", [])
    assert argv[argv.index("-kernel") + 1] == str(image)
    assert argv[argv.index("-machine") + 1] == "q35"
    cmdline = argv[argv.index("-append") + 1]
    assert "pci=noacpi" not in cmdline and cmdline.endswith("cryptomgr.notests module.sig_enforce=1")
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    code = firmware.OVMF_DIR / firmware.OVMF_CODE
    assert drives == [f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                      f"if=pflash,format=raw,unit=1,file={state / 'OVMF_VARS.fd'}"]
    assert (state / "OVMF_VARS.fd").read_bytes() == firmware.enrolled_vars([str(cert)]).read_bytes()
