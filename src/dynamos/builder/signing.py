"""Signers: who vouches for an update, and the two signatures they make.

A signer is a directory with two keys, because the two checkers speak different formats:

    module.key, module.crt, module.der   X.509 (RSA): signs the module the way the kernel checks
                                         it (PKCS#7 trailer); the certificate goes into the
                                         kernel's keyrings (UEFI db, MOK) on enforcing hosts
    package.key                          OpenPGP secret key (ed25519): signs manifest.json, which
                                         holds the sha256 of the (already signed) module
    trusted.gpg                          its public key: what a host puts in its trust store
    signer.json                          name, OpenPGP fingerprint and X.509 key id, for messages

The package signature is checked by ``gpgv`` (on every Debian host: apt verifies the archive with
it), so runtime commands stay standard-library Python. Making keys and signing needs openssl and
gpg, which only build machines have.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dynamos.builder.modsign import run_tool as _run
from dynamos.builder.modsign import sign_module
from dynamos.errors import BuildError

SIGNER_FILES = ("module.key", "module.crt", "package.key", "trusted.gpg", "signer.json")
SIGNER_ENV = "DYNAMOS_SIGNER"
DEFAULT_SIGNER_DIR = Path("/etc/dynamos/signer")
LAB_SIGNER_NAME = "dynamos lab key"


@dataclass(frozen=True)
class Signer:
    """A signer directory, checked complete."""

    directory: Path
    name: str
    fingerprint: str  # OpenPGP, of the package key
    module_key_id: str  # X.509 subject key identifier, lower-case hex: how the kernel names the key

    @property
    def module_key(self) -> Path:
        return self.directory / "module.key"

    @property
    def module_cert(self) -> Path:
        return self.directory / "module.crt"

    @property
    def trusted_keyring(self) -> Path:
        return self.directory / "trusted.gpg"

    @property
    def trust_store(self) -> Path:
        """A trust-store directory holding only this signer (what a lab guest is given)."""
        return self.directory / "trusted"

    def manifest_signer(self) -> dict[str, str]:
        """What the manifest says about its signer (checked against the signature on apply)."""
        return {"name": self.name, "fingerprint": self.fingerprint, "module_key_id": self.module_key_id}

    def sign_module(self, module: bytes) -> bytes:
        """``module`` with the kernel's PKCS#7 signature trailer appended (replacing any)."""
        return sign_module(module, self.module_key, self.module_cert)

    def sign_manifest(self, manifest: bytes) -> bytes:
        """A detached binary OpenPGP signature of ``manifest``."""
        with _gnupg_home() as home:
            _run(["gpg", "--homedir", home, "--batch", "--quiet", "--import", str(self.directory / "package.key")],
                 "importing the package signing key")
            return _run(["gpg", "--homedir", home, "--batch", "--quiet", "--pinentry-mode", "loopback",
                         "--passphrase", "", "--local-user", self.fingerprint, "--detach-sign",
                         "--digest-algo", "SHA256", "--output", "-"], "signing the package", stdin=manifest)


@contextmanager
def _gnupg_home() -> Iterator[str]:
    """A throwaway GnuPG home: signing never touches the user's keyrings; its agent is stopped."""
    home = tempfile.mkdtemp(prefix="dynamos-gnupg-")
    try:
        yield home
    finally:
        if shutil.which("gpgconf"):
            subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def _cert_key_id(cert: Path) -> str:
    text = _run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectKeyIdentifier"],
                "reading the certificate").decode()
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    if not lines:
        raise BuildError(f"{cert}: certificate has no subjectKeyIdentifier (the kernel names keys by it)")
    return lines[0].replace(":", "").lower()


def load_signer(directory: Path | str) -> Signer:
    """The signer in ``directory``; BuildError naming what is missing."""
    directory = Path(directory)
    missing = [f for f in SIGNER_FILES if not (directory / f).is_file()]
    if missing:
        raise BuildError(f"{directory}: not a signer directory (missing {', '.join(missing)}); "
                         "make one with 'dynamos signer new DIR --name NAME'")
    try:
        info = json.loads((directory / "signer.json").read_text())
        return Signer(directory, str(info["name"]), str(info["fingerprint"]), str(info["module_key_id"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{directory / 'signer.json'}: unreadable ({e})") from e


def new_signer(directory: Path | str, name: str) -> Signer:
    """Make a signer: an X.509 module key and an OpenPGP package key, both unprotected (builds
    are unattended; keep the directory private). Refuses to overwrite an existing signer."""
    directory = Path(directory)
    if any((directory / f).exists() for f in SIGNER_FILES):
        raise BuildError(f"{directory}: already holds a signer; not overwriting it")
    if not name or any(c in name for c in "\n\r/<>\"") or len(name) > 64:
        raise BuildError(f"signer name {name!r}: 1-64 characters, no newline, '/', '<', '>' or '\"'")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key, cert = directory / "module.key", directory / "module.crt"
    with tempfile.NamedTemporaryFile("w", suffix=".cnf") as conf:
        # The kernel's own x509.genkey extensions: a leaf key for signing, named by its key id.
        conf.write(f"[req]\ndistinguished_name=dn\nprompt=no\nx509_extensions=ext\n[dn]\nCN={name}\n"
                   "[ext]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        conf.flush()
        _run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:3072", "-nodes", "-sha256", "-days", "36500",
              "-config", conf.name, "-keyout", str(key), "-out", str(cert)], "making the module key")
    os.chmod(key, 0o600)
    _run(["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(directory / "module.der")],
         "writing the certificate as DER")
    with _gnupg_home() as home:
        gpg = ["gpg", "--homedir", home, "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]
        _run([*gpg, "--quick-gen-key", name, "ed25519", "sign", "never"], "making the package key")
        listing = _run([*gpg, "--with-colons", "--list-secret-keys"], "listing the package key").decode()
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        secret = _run([*gpg, "--armor", "--export-secret-keys", fingerprint], "exporting the package key")
        public = _run([*gpg, "--export", fingerprint], "exporting the public key")
    fd = os.open(directory / "package.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    (directory / "trusted.gpg").write_bytes(public)
    store = directory / "trusted"
    store.mkdir(exist_ok=True)
    (store / f"{fingerprint[-16:].lower()}.gpg").write_bytes(public)
    signer = Signer(directory, name, fingerprint, _cert_key_id(cert))
    (directory / "signer.json").write_text(json.dumps(
        {"name": signer.name, "fingerprint": signer.fingerprint, "module_key_id": signer.module_key_id},
        indent=2) + "\n")
    return signer


def lab_signer(cache: Path) -> Signer:
    """The lab key, made on first use under the cache: what builds for labs are signed with when
    no signer is configured. Labs trust it inside the guest; no host trusts it unless told to.
    Once made it is only read (a lab guest sees the cache read-only)."""
    directory = cache / "lab-signer"
    if (directory / "signer.json").is_file():
        return load_signer(directory)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lab-signer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "signer.json").is_file():
            shutil.rmtree(directory, ignore_errors=True)  # a half-made one from a killed run
            tmp = Path(tempfile.mkdtemp(prefix=".lab-signer-", dir=cache))
            new_signer(tmp, f"{LAB_SIGNER_NAME} ({os.uname().nodename[:32]})")
            os.replace(tmp, directory)
    return load_signer(directory)


def configured_signer(explicit: str | None, cache: Path) -> Signer:
    """The signer a build uses: ``--signer``, else ``$DYNAMOS_SIGNER``, else /etc/dynamos/signer,
    else the lab key."""
    if explicit:
        return load_signer(explicit)
    if os.environ.get(SIGNER_ENV):
        return load_signer(os.environ[SIGNER_ENV])
    if (DEFAULT_SIGNER_DIR / "signer.json").is_file():
        return load_signer(DEFAULT_SIGNER_DIR)
    return lab_signer(cache)
