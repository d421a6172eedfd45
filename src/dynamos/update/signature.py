"""Package signatures, checked against a trust store with ``gpgv``.

A package's ``manifest.sig`` is a detached OpenPGP signature of ``manifest.json``, whose digests
cover the (already signed) module and the build log: one signature vouches for everything.
``gpgv`` is what apt verifies the Debian archive with, so every Debian host has it, and it only
verifies: no keyring of the user's, no trust database, no agent.

The trust store is a directory of OpenPGP public keyrings (``*.gpg``), one per trusted signer:
adding a file trusts a signer, removing it revokes it. ``/etc/dynamos/trusted`` by default;
``$DYNAMOS_TRUST_STORE`` or ``--trust-store`` point elsewhere (labs and tests).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dynamos.errors import PackageError

TRUST_STORE_ENV = "DYNAMOS_TRUST_STORE"
DEFAULT_TRUST_STORE = Path("/etc/dynamos/trusted")
GPGV_TIMEOUT = 30.0


class SignatureRefused(PackageError):
    """A package whose signature does not show a trusted signer vouching for it (nothing loaded)."""

    def __init__(self, code: str, message: str, *, path: Path | str | None = None):
        self.code = code
        super().__init__(message, path=path)

    def refusals(self) -> list[dict[str, str]]:
        return [{"code": self.code, "message": self.message}]


@dataclass(frozen=True)
class VerifiedSigner:
    """Who signed a package, as gpgv established it (or ``unsigned`` when allowed)."""

    name: str
    fingerprint: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})" if self.fingerprint else self.name


UNSIGNED = VerifiedSigner("unsigned (allowed by --allow-unsigned)", "")


def trust_store_path(explicit: Path | str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(TRUST_STORE_ENV) or DEFAULT_TRUST_STORE)


def trusted_keyrings(store: Path) -> list[Path]:
    """The keyrings in ``store``: regular ``*.gpg`` files (a symlink or directory is not trusted)."""
    try:
        entries = sorted(store.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SignatureRefused("trust-store", f"cannot read the trust store {store}: {e.strerror}") from e
    return [p for p in entries if p.suffix == ".gpg" and stat.S_ISREG(p.lstat().st_mode)]


def _claimed(manifest: dict) -> str:
    signer = manifest.get("signer") or {}
    if not isinstance(signer, dict) or not signer.get("fingerprint"):
        return ""
    return f" (the manifest names {signer.get('name', '?')!s}, {signer['fingerprint']!s})"


def verify_signature(manifest_bytes: bytes, signature: bytes | None, manifest: dict, *,
                     store: Path, path: Path | None = None) -> VerifiedSigner:
    """The signer of a package, verified by gpgv against the keyrings in ``store``.

    Refused (SignatureRefused, with a code): no signature; no trust store; a key the store does
    not hold (named by its id and by the name the manifest claims); a bad or expired signature;
    a valid signature by another key than the manifest names.
    """
    if signature is None:
        raise SignatureRefused("unsigned", "package is not signed (build it with a signer, or pass "
                               "--allow-unsigned to load it anyway, for development only)", path=path)
    keyrings = trusted_keyrings(store)
    if not keyrings:
        raise SignatureRefused("trust-store", f"no trusted signers: the trust store {store} holds no *.gpg "
                               f"keyring (add a signer's trusted.gpg there){_claimed(manifest)}", path=path)
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise SignatureRefused("no-gpgv", "gpgv not found: cannot verify package signatures "
                               "(install the gpgv package)", path=path)
    with tempfile.TemporaryDirectory(prefix="dynamos-verify-") as tmp:
        sig_path, data_path = Path(tmp) / "manifest.sig", Path(tmp) / "manifest.json"
        sig_path.write_bytes(signature)
        data_path.write_bytes(manifest_bytes)
        argv = [gpgv, "--homedir", tmp, "--status-fd", "1"]
        for ring in keyrings:
            argv += ["--keyring", str(ring.resolve())]
        try:
            proc = subprocess.run([*argv, str(sig_path), str(data_path)], capture_output=True,
                                  timeout=GPGV_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as e:
            raise SignatureRefused("bad-signature", "gpgv did not finish verifying the signature", path=path) from e
    return _signer_of(proc.stdout.decode(errors="replace"), manifest, store, path)


def _signer_of(status: str, manifest: dict, store: Path, path: Path | None) -> VerifiedSigner:
    """Read gpgv's machine-readable status lines (``[GNUPG:] KEYWORD args``)."""
    lines: dict[str, list[str]] = {}
    for line in status.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "[GNUPG:]":
            lines.setdefault(words[1], words[2:])
    for keyword, what in (("BADSIG", "signature does not match: the manifest was changed after signing"),
                          ("EXPKEYSIG", "signed with an expired key"),
                          ("REVKEYSIG", "signed with a revoked key"),
                          ("EXPSIG", "the signature has expired")):
        if keyword in lines:
            raise SignatureRefused("bad-signature", f"{what} ({' '.join(lines[keyword])})", path=path)
    if "NO_PUBKEY" in lines or ("ERRSIG" in lines and "VALIDSIG" not in lines):
        key = (lines.get("NO_PUBKEY") or lines.get("ERRSIG") or ["?"])[0]
        raise SignatureRefused("unknown-signer", f"signed by key {key}, which is not in the trust store "
                               f"{store}{_claimed(manifest)}", path=path)
    if "VALIDSIG" not in lines or "GOODSIG" not in lines:
        raise SignatureRefused("bad-signature", "gpgv did not report a valid signature", path=path)
    fingerprint = lines["VALIDSIG"][-1]  # the primary key's fingerprint
    name = status.split("GOODSIG", 1)[1].split(None, 1)[1].splitlines()[0].strip()
    claimed = manifest.get("signer") or {}
    if isinstance(claimed, dict) and claimed.get("fingerprint") not in (None, fingerprint):
        raise SignatureRefused("signer-mismatch", f"signed by {name} ({fingerprint}), but the manifest names "
                               f"{claimed.get('fingerprint')}", path=path)
    return VerifiedSigner(name, fingerprint)
