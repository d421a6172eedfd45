"""Module signatures on hosts that enforce them, proven on the real kernel under real firmware.

A UEFI lab (OVMF) boots with a throwaway certificate in the UEFI db. Debian's 6.1 kernel loads db
into its ``.platform`` keyring even with Secure Boot off and lets module signature checks fall back
to that keyring, so the guest trusts modules signed with the throwaway key. One lab boots with
``module.sig_enforce=1``, one with ``lockdown=integrity``; in each, a tiny module built against the
target's headers is loaded signed by the trusted key, unsigned, signed by a foreign key, and
signed then altered, and the kernel's errno and log lines are checked for each.

What the kernel does (6.1.0-56-amd64; kernel/module/signing.c):
- sig_enforce: unsigned and foreign-key modules fail with EKEYREJECTED, logging "Loading of
  unsigned module is rejected" / "Loading of module with unavailable key is rejected".
- lockdown=integrity: the same two fail with EPERM and "Lockdown: <comm>: unsigned module loading
  is restricted; see man kernel_lockdown.7".
- An altered module signed by the trusted key fails with EKEYREJECTED in both, with no log line
  of its own (the signature does not verify: no fallback to the lockdown or enforce policy).
- A signature naming its signer by subject key id (``openssl cms -keyid``) is accepted like one
  naming it by issuer and serial number (what sign-file writes).
- The db certificate is in /proc/keys as an ``asymmetri`` key whose description is
  "<name>: <subject key id, lowercase hex>" (the serial number's hex when the certificate has no
  SKID), <name> being the CN, or "<O>: <CN>" when the CN does not start with the O (the kernel's
  x509_fabricate_name; the first 7 bytes alike count as a start). It also logs
  "integrity: Loaded X.509 cert '<description>'" after "integrity: Loading X.509 certificate: UEFI:db".
- lockdown=integrity: /sys/kernel/security/lockdown reads "none [integrity] confidentiality";
  debugfs stays mounted but its files refuse reads and writes (EPERM, "Lockdown: <comm>: debugfs
  access is restricted"), /dev/mem is refused; tracefs, ftrace, kallsyms and the lab agent work,
  and ``dynamos apply`` of a package whose module key is in db applies and reverts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamos.builder.modsign import sign_module
from dynamos.builder.signing import configured_signer
from dynamos.lab import Lab
from dynamos.lab.vm import labs_dir
from dynamos.target import cache_root
from dynamos.update.modsig import read_module_signature, trailer

from .conftest import EXAMPLES, Guest, lab_config

pytestmark = pytest.mark.lab

MODULE = "dynamos_sigtest"
MODULE_SOURCE = r"""
#include <linux/module.h>
#include <linux/init.h>

static int __init sigtest_init(void)
{
	pr_info("dynamos_sigtest: loaded\n");
	return 0;
}

static void __exit sigtest_exit(void)
{
}

module_init(sigtest_init);
module_exit(sigtest_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dynamos lab: a module to sign");
"""
VARIANTS = ("trusted", "keyid", "unsigned", "foreign", "altered")

# Runs in the guest: loads each module file, records the errno and the kernel log lines that the
# load printed, unloads what loaded. Output: one JSON object.
GUEST_LOADER = r"""
import errno, json, os, sys
from dynamos.kernel import LibcSyscalls

def kmsg_after(fd):
    lines = []
    while True:
        try:
            rec = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            return lines
        lines.append(rec.split(";", 1)[-1].strip())

sc = LibcSyscalls()
results = {}
for path in sys.argv[2:]:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    try:
        sc.init_module(open(path, "rb").read())
        err = None
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    if err is None:
        sc.delete_module(sys.argv[1])
    results[os.path.basename(path)] = {"errno": err, "kmsg": kmsg_after(fd)}
    os.close(fd)
print(json.dumps(results))
"""


@pytest.fixture(autouse=True)
def kernel_left_as_found():
    """These tests boot labs of their own: the session lab's check does not apply (and would boot it)."""
    yield


def openssl_cert(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", subject, "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectKeyIdentifier=hash", "-addext", "keyUsage=digitalSignature",
                    "-addext", "extendedKeyUsage=codeSigning"], check=True, capture_output=True)
    return key, cert


def subject_key_id(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectKeyIdentifier"],
                         check=True, capture_output=True, text=True).stdout
    return out.splitlines()[-1].strip().replace(":", "").lower()


def sign_by_key_id(module: bytes, key: Path, cert: Path) -> bytes:
    """``module`` signed as sign_module signs it, but the signer named by its subject key id."""
    signature = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-noattr", "-nocerts", "-nosmimecap", "-md", "sha256",
         "-outform", "DER", "-signer", str(cert), "-inkey", str(key), "-keyid"],
        input=module, check=True, capture_output=True).stdout
    return module + trailer(signature)


@pytest.fixture(scope="module")
def keys(workdir) -> dict[str, tuple[Path, Path]]:
    d = workdir / "sigkeys"
    d.mkdir(exist_ok=True)
    return {"trusted": openssl_cert(d, "trusted", "/O=dynamos tests/CN=dynamos lab trusted key"),
            "foreign": openssl_cert(d, "foreign", "/O=dynamos tests/CN=dynamos lab foreign key")}


@pytest.fixture(scope="module")
def module_files(target, workdir, keys) -> dict[str, str]:
    """The test module built against the target's headers, as each variant's file."""
    build = workdir / "sigtest-module"
    build.mkdir(exist_ok=True)
    (build / f"{MODULE}.c").write_text(MODULE_SOURCE)
    (build / "Kbuild").write_text(f"obj-m := {MODULE}.o\n")
    r = subprocess.run(["make", "-s", "-C", str(target.headers_dir), f"M={build}", "modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"building {MODULE} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    plain = (build / f"{MODULE}.ko").read_bytes()
    assert read_module_signature(plain) is None, "Kbuild signed the module: the unsigned case would not be one"
    trusted = sign_module(plain, *keys["trusted"])
    # Altered after signing: one byte of the module body (inside its .modinfo description string).
    at = trusted.index(b"a module to sign")
    altered = trusted[:at] + b"A" + trusted[at + 1:]
    images = {"trusted": trusted, "keyid": sign_by_key_id(plain, *keys["trusted"]),
              "unsigned": plain, "foreign": sign_module(plain, *keys["foreign"]), "altered": altered}
    files = {}
    for name, image in images.items():
        path = build / f"{name}.ko"
        path.write_bytes(image)
        files[name] = str(path)
    (build / "loader.py").write_text(GUEST_LOADER)
    return files


def boot_uefi(target, workdir, name: str, certs: list[Path], append: str) -> tuple[Lab, float]:
    state_dir = labs_dir() / f"pytest-{name}-{Path(workdir).name}"
    t0 = time.monotonic()
    # Both vCPUs on one QEMU thread: enabling the function tracer rewrites every ftrace site, and
    # QEMU 7.2's multi-threaded TCG can hang a vCPU on code rewritten under it (README, "The
    # two-vCPU stalls are QEMU's"); seen here once in CI.
    lab = Lab.boot(lab_config(target, workdir, firmware="uefi", db_certs=[str(c) for c in certs], append=append,
                              boot_timeout=180, tcg_threads="single"),
                   state_dir=state_dir, progress=lambda m: print(f"lab {name}: {m}", file=sys.stderr))
    return lab, time.monotonic() - t0


def load_all(guest: Guest, files: dict[str, str]) -> dict[str, dict]:
    loader = str(Path(files["trusted"]).parent / "loader.py")
    out = guest.run(sys.executable, loader, MODULE, *(files[v] for v in VARIANTS)).stdout
    results = json.loads(out)
    return {v: results[Path(files[v]).name] for v in VARIANTS}


def platform_key_line(guest: Guest, cert: Path) -> str:
    """The /proc/keys line of the db certificate: description "<CN>: <subject key id, hex>"."""
    keys_text = guest.read("/proc/keys")
    assert re.search(r"keyring\s+\.platform: [1-9]", keys_text), keys_text
    skid = subject_key_id(cert)
    lines = [line for line in keys_text.splitlines() if f"dynamos lab trusted key: {skid}" in line]
    assert len(lines) == 1, f"the db certificate (key id {skid}) is not in /proc/keys:\n{keys_text}"
    assert " asymmetri " in lines[0] and "X509.rsa" in lines[0], lines[0]
    return lines[0]


def test_sig_enforce_trusts_only_the_db_key(target, workdir, keys, module_files):
    lab, boot_s = boot_uefi(target, workdir, "sig-enforce", [keys["trusted"][1]], "module.sig_enforce=1")
    try:
        guest = Guest(lab)
        print(f"UEFI lab up in {boot_s:.1f} s; {platform_key_line(guest, keys['trusted'][1])}", file=sys.stderr)
        assert guest.read("/sys/module/module/parameters/sig_enforce").strip() == "Y"
        assert "secureboot: Secure boot disabled" in guest.sh("dmesg")  # db is trusted all the same
        t0 = time.monotonic()
        r = load_all(guest, module_files)
        print(f"loads in {time.monotonic() - t0:.1f} s: {json.dumps(r)}", file=sys.stderr)
        for variant in ("trusted", "keyid"):
            assert r[variant]["errno"] is None and "dynamos_sigtest: loaded" in r[variant]["kmsg"], r[variant]
        assert r["unsigned"]["errno"] == "EKEYREJECTED", r["unsigned"]
        assert "Loading of unsigned module is rejected" in r["unsigned"]["kmsg"], r["unsigned"]
        assert r["foreign"]["errno"] == "EKEYREJECTED", r["foreign"]
        assert "Loading of module with unavailable key is rejected" in r["foreign"]["kmsg"], r["foreign"]
        assert r["altered"]["errno"] == "EKEYREJECTED", r["altered"]
        assert MODULE not in guest.modules()
    finally:
        lab.kill()
        lab.discard()


def test_lockdown_integrity_trusts_only_the_db_key(target, workdir, keys, module_files, build):
    pkg = build(EXAMPLES / "cmdline-banner")  # its module signed by the configured signer (the lab key)
    signer = configured_signer(None, cache_root())
    lab, boot_s = boot_uefi(target, workdir, "lockdown", [keys["trusted"][1], signer.module_cert],
                            "lockdown=integrity")
    try:
        guest = Guest(lab)
        print(f"UEFI lab up in {boot_s:.1f} s", file=sys.stderr)
        platform_key_line(guest, keys["trusted"][1])
        assert guest.read("/sys/kernel/security/lockdown").strip() == "none [integrity] confidentiality"
        assert guest.read("/sys/module/module/parameters/sig_enforce").strip() == "N"
        r = load_all(guest, module_files)
        print(f"loads: {json.dumps(r)}", file=sys.stderr)
        for variant in ("trusted", "keyid"):
            assert r[variant]["errno"] is None and "dynamos_sigtest: loaded" in r[variant]["kmsg"], r[variant]
        lockdown_says = re.compile(r"^Lockdown: \S+: unsigned module loading is restricted; "
                                   r"see man kernel_lockdown\.7$")
        for variant in ("unsigned", "foreign"):
            assert r[variant]["errno"] == "EPERM", r[variant]
            assert any(lockdown_says.match(line) for line in r[variant]["kmsg"]), r[variant]
        assert r["altered"]["errno"] == "EKEYREJECTED", r["altered"]
        # Integrity lockdown shuts debugfs (read and write: nothing of dynamos or the lab uses it),
        # not tracefs, ftrace or kallsyms.
        tracer = "/sys/kernel/tracing/current_tracer"
        out = guest.sh("cat /sys/kernel/debug/sched/features 2>&1; echo status=$?; "
                       f"echo function > {tracer} && echo nop > {tracer} && echo tracer=ok; "
                       "grep -m1 ' T do_sys_open' /proc/kallsyms; dmesg | grep debugfs")
        assert "Operation not permitted" in out and "status=1" in out and "tracer=ok" in out, out
        assert re.search(r"^ffffffff[0-9a-f]{8} T do_sys_open$", out, re.M), out
        assert "Lockdown: cat: debugfs access is restricted; see man kernel_lockdown.7" in out, out
        # dynamos itself: apply finds the signer's key id in /proc/keys and the kernel takes the module.
        original = guest.read("/proc/cmdline")
        guest.dynamos("apply", str(pkg))
        assert guest.read("/proc/cmdline").startswith("[live-updated by dynamos]")
        guest.dynamos("revert", "cmdline-banner")
        assert guest.livepatches() == [] and guest.read("/proc/cmdline") == original
        assert MODULE not in guest.modules()
    finally:
        lab.kill()
        lab.discard()
