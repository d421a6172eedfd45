"""Whether a package may be loaded: who signed it, whether it is a replay, whether the kernel will
take its module.

Three questions, asked before anything touches the kernel:

- the package's signature, verified by gpgv against the trust store (``update.signature``);
- replays: a signed package older than the newest one this host accepted for the same update
  is refused unless asked, so an attacker cannot bring back a fix that was superseded;
- on a host that enforces module signatures (``module.sig_enforce=1`` or lockdown), whether the
  module is signed, and with a key the kernel's keyrings hold (``/proc/keys``), so an unsigned
  module and one signed by a key the kernel does not know are refused with different reasons.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.kernel.modules import lockdown_mode
from dynamos.kernel.refusals import PreflightRefused, Refusal
from dynamos.update.modsig import read_module_signature
from dynamos.update.package import UpdatePackage
from dynamos.update.signature import UNSIGNED, VerifiedSigner, trust_store_path, verify_signature

ACCEPTED_DIR = "var/lib/dynamos/accepted"  # under root: the newest package accepted per update


@dataclass(frozen=True)
class TrustPolicy:
    """What ``apply`` accepts: packages signed by a signer in ``store``; unsigned ones only with
    ``allow_unsigned``; one older than the newest accepted for its update only with ``allow_older``."""

    store: Path = field(default_factory=trust_store_path)
    allow_unsigned: bool = False
    allow_older: bool = False

    def verify(self, pkg: UpdatePackage) -> VerifiedSigner:
        """The package's verified signer; SignatureRefused when it has none the store trusts."""
        if pkg.signature is None and self.allow_unsigned:
            return UNSIGNED
        return verify_signature(pkg.manifest_bytes, pkg.signature, pkg.manifest, store=self.store, path=pkg.path)


class AcceptedPackages:
    """The newest package this host accepted per update (``created`` time and module digest),
    kept across reboots under ``/var/lib/dynamos``: the reference for refusing replays."""

    def __init__(self, root: Path):
        self.directory = root / ACCEPTED_DIR

    def newest(self, name: str) -> dict[str, str] | None:
        try:
            data = json.loads((self.directory / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("created"), str) else None

    def check(self, pkg: UpdatePackage, policy: TrustPolicy, live_created: str | None) -> None:
        """Refuse a package built before the newest accepted (or live) one of the same update."""
        if policy.allow_older:
            return
        known = [c for c in (live_created, (self.newest(pkg.name) or {}).get("created")) if c]
        newest = max(known, default=None)
        if newest is not None and pkg.manifest["created"] < newest:
            raise PreflightRefused(pkg.livepatch_name, [Refusal.make(
                "older-package", update=pkg.name, created=pkg.manifest["created"], newest=newest)])

    def remember(self, pkg: UpdatePackage, signer: VerifiedSigner) -> None:
        """Record ``pkg`` as accepted (atomically; a failure only loses replay protection)."""
        newest = self.newest(pkg.name)
        if newest is not None and newest["created"] > pkg.manifest["created"]:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{pkg.name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps({"created": pkg.manifest["created"], "module_sha256": pkg.module_sha256,
                                       "signer": signer.to_json()}) + "\n")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # no half-written file left behind (a full disk)
            raise


def _sig_enforced(root: Path) -> bool:
    try:
        return (root / "sys/module/module/parameters/sig_enforce").read_text().strip() in ("Y", "1")
    except OSError:
        return False


def enforcement(root: Path) -> str | None:
    """Why the kernel will check module signatures (lockdown, sig_enforce), None if it will not."""
    mode = lockdown_mode(root)
    if mode not in (None, "none"):
        return f"kernel lockdown ({mode})"
    return "module.sig_enforce=1" if _sig_enforced(root) else None


def kernel_key_descriptions(root: Path) -> list[str] | None:
    """Descriptions of the asymmetric keys in the kernel's keyrings (e.g. "Debian Secure Boot CA:
    6ccece7e..."; the hex is the X.509 subject key id), None when /proc/keys cannot be read."""
    try:
        text = (root / "proc/keys").read_text()
    except OSError:
        return None
    found = []
    for line in text.splitlines():
        words = line.split(None, 8)
        if len(words) == 9 and words[7].startswith("asymmetri"):  # the type column is 9 wide
            found.append(words[8])
    return found


def module_signature_refusals(root: Path, pkg: UpdatePackage, notes: list[str]) -> list[Refusal]:
    """On an enforcing kernel: refusals for an unsigned module or one signed by a key the kernel
    does not hold (told apart), none otherwise."""
    why = enforcement(root)
    if why is None:
        return []
    if read_module_signature(pkg.module) is None:
        return [Refusal.make("module-unsigned", why=why)]
    claim = pkg.signer_claim or {}
    key_id = claim.get("module_key_id", "").lower()
    keys = kernel_key_descriptions(root)
    if keys is None:
        notes.append(f"{why}: could not read /proc/keys to check the module's key; the kernel decides")
        return []
    if not key_id:
        return [Refusal.make("module-key-unknown", why=why)]
    if not any(key_id in desc.lower() for desc in keys):
        return [Refusal.make("module-key-untrusted", why=why, signer=claim.get("name", "?"), key_id=key_id)]
    return []
