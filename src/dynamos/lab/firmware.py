"""UEFI firmware for a lab: Debian's OVMF, with X.509 certificates enrolled in the ``db`` of a copy
of its variable store.

Why: Debian's kernel fills its ``.platform`` keyring from the UEFI db at boot even with Secure Boot
off (CONFIG_LOAD_UEFI_KEYS), and Debian's patches let module signature checks fall back to that
keyring; so a lab booted with a certificate in db trusts modules signed with it, which is how the
lab proves module-signature handling on ``module.sig_enforce=1`` and ``lockdown=integrity`` hosts.

The store with the certificates enrolled is made once by ``virt-fw-vars`` (PyPI ``virt-firmware``,
a lab/test dependency only) and cached under ``<cache>/uefi`` by the certificates' sha256; each lab
boots on its own copy in its state dir, since the firmware writes to its variable store.

Only the non-Secure-Boot OVMF build is used (the .secboot one needs SMM); the machine is q35, on
which this kernel starts faster under OVMF than on pc. QEMU's ``-kernel`` hands the bzImage to OVMF,
which starts it through the EFI stub, with the same initramfs and command line as a direct boot,
less ``pci=noacpi`` (OVMF has no PCI IRQ routing table, and without ACPI the kernel cannot claim
the BARs OVMF assigned: the virtio devices then never appear).

Cost under TCG (2-core host, 2 vCPUs): OVMF takes ~6.4 s before the EFI stub runs, and the whole
boot to a ready agent ~9-12 s, against ~2.3 s for the direct PVH boot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dynamos.errors import LabError
from dynamos.target import cache_root

OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = "OVMF_CODE_4M.fd"  # 4 MiB build, Secure Boot off (the .secboot build needs SMM and q35)
OVMF_VARS = "OVMF_VARS_4M.fd"  # its empty variable store: no PK, KEK or db
# Owner GUID recorded with each enrolled certificate (the kernel ignores it); fixed, so a cached
# store is the same bytes for the same certificates.
DB_OWNER = "6c2d7b41-8a4e-4f0e-9d2b-64796e616d6f"
FIRMWARES = ("pvh", "uefi")
# Stores kept in the cache, most recently used first: test keys are throwaway, one store a session.
KEEP_STORES = 8


def ovmf_file(name: str, ovmf_dir: Path = OVMF_DIR) -> Path:
    path = ovmf_dir / name
    if not path.is_file():
        raise LabError(f"UEFI lab: {path} not found: install the ovmf package (apt-get install ovmf)")
    return path


def virt_fw_vars() -> str:
    """The ``virt-fw-vars`` program: on PATH, or beside this interpreter (a venv not activated)."""
    found = shutil.which("virt-fw-vars") or shutil.which("virt-fw-vars", path=str(Path(sys.executable).parent))
    if found is None:
        raise LabError("UEFI lab: virt-fw-vars not found: install the virt-firmware package from PyPI "
                       "(pip install virt-firmware, or dynamos' test extra: pip install -e '.[test]')")
    return found


def cert_digests(certs: Sequence[str]) -> list[str]:
    digests = []
    for cert in certs:
        try:
            digests.append(hashlib.sha256(Path(cert).read_bytes()).hexdigest())
        except OSError as e:
            raise LabError(f"UEFI lab: cannot read db certificate {cert}: {e.strerror}") from None
    return digests


def enrolled_vars(certs: Sequence[str], ovmf_dir: Path = OVMF_DIR) -> Path:
    """The cached OVMF variable store with ``certs`` (PEM or DER files) in db, made on first use.

    Keyed by the empty store's and the certificates' sha256, in order: a changed certificate file
    or an upgraded ovmf package makes a new store, never a stale one."""
    template = ovmf_file(OVMF_VARS, ovmf_dir)
    key = hashlib.sha256()
    key.update(hashlib.sha256(template.read_bytes()).digest())
    for digest in cert_digests(certs):
        key.update(bytes.fromhex(digest))
    out_dir = cache_root() / "uefi"
    out = out_dir / f"vars-{key.hexdigest()[:32]}.fd"
    if out.is_file():
        os.utime(out)  # recently used: kept by the pruning below
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{out.name}.{os.getpid()}.tmp"
    argv = [virt_fw_vars(), "--input", str(template), "--output", str(tmp)]
    for cert in certs:
        argv += ["--add-db", DB_OWNER, str(cert)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        said = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise LabError(f"UEFI lab: virt-fw-vars could not enroll {', '.join(certs)} in db: " + " / ".join(said))
    tmp.rename(out)
    _prune(out_dir)
    return out


def _prune(out_dir: Path) -> None:
    def last_used(store: Path) -> float:
        try:
            return store.stat().st_mtime
        except FileNotFoundError:  # pruned meanwhile by another lab
            return 0.0

    stores = sorted(out_dir.glob("vars-*.fd"), key=last_used, reverse=True)
    for old in stores[KEEP_STORES:]:
        old.unlink(missing_ok=True)


def firmware_argv(certs: Sequence[str], state_dir: Path, ovmf_dir: Path = OVMF_DIR) -> list[str]:
    """QEMU options for OVMF: its code read-only, and this lab's own writable copy of the store."""
    code = ovmf_file(OVMF_CODE, ovmf_dir)
    store = enrolled_vars(certs, ovmf_dir)
    lab_vars = state_dir / "OVMF_VARS.fd"
    shutil.copyfile(store, lab_vars)
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_value(code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={_value(lab_vars)}"]


def _value(path: Path) -> str:
    return str(path).replace(",", ",,")
