"""Signatures and replays, on the simulated kernel with real signatures: which packages ``apply`` accepts.

Packages are signed by real signers (openssl for the module, gpg for the manifest) and verified
by the real gpgv against a trust store directory; only the kernel is simulated.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from dynamos.builder.signing import Signer
from dynamos.kernel import PreflightRefused
from dynamos.update.modsig import read_module_signature
from dynamos.update.signature import SignatureRefused
from tests.support.forgery import forge_manifest
from tests.support.harness import KernelHarness


def signature_refusal(h: KernelHarness, path) -> SignatureRefused:
    loads = len(h.syscalls("init_module"))
    with pytest.raises(SignatureRefused) as info:
        h.kernel.apply(path)
    assert len(h.syscalls("init_module")) == loads  # refused before anything reached the kernel
    return info.value


def test_signed_package_applies_and_status_names_the_signer(harness: KernelHarness, signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    result = h.kernel.apply(h.add("fix-x", signer=signer))
    assert result.name == "fix-x"
    update = h.kernel.status().updates[0]
    assert update.signer == {"name": "dynamos test signer", "fingerprint": signer.fingerprint}
    assert json.loads(h.record("fix_x").read_text())["signer"]["fingerprint"] == signer.fingerprint


def test_module_is_signed_before_the_manifest_digests_it(harness: KernelHarness, signer: Signer) -> None:
    pkg = harness.package("fix-x", signer=signer)
    sig = read_module_signature(pkg.module)
    assert sig is not None and sig.id_type == 2 and sig.signature[:1] == b"\x30"  # DER SEQUENCE
    assert pkg.manifest["digests"]["module.ko"] == pkg.module_sha256
    assert pkg.signer_claim == signer.manifest_signer()


def test_unsigned_is_refused_unless_allowed(harness: KernelHarness, signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    err = signature_refusal(h, h.add("fix-x"))
    assert err.code == "unsigned" and "--allow-unsigned" in str(err)
    h.use_trust(allow_unsigned=True)
    h.kernel.apply(h.add("fix-x"))
    assert h.kernel.status().updates[0].signer["fingerprint"] == ""


def test_unknown_signer_is_named(harness: KernelHarness, signer: Signer, other_signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    err = signature_refusal(h, h.add("fix-x", signer=other_signer))
    assert err.code == "unknown-signer"
    assert other_signer.fingerprint[-16:] in str(err) and "someone else" in str(err)


def test_several_signers_and_removal_revokes(harness: KernelHarness, signer: Signer, other_signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    other = h.trust(other_signer)
    h.kernel.apply(h.add("fix-a", signer=signer))
    h.kernel.apply(h.add("fix-b", "vfs_read", signer=other_signer))
    other.unlink()
    h.kernel.revert("fix-b")
    assert signature_refusal(h, h.add("fix-b", "vfs_read", signer=other_signer)).code == "unknown-signer"


def test_empty_trust_store_says_where(harness: KernelHarness, signer: Signer) -> None:
    h = harness
    h.use_trust()
    err = signature_refusal(h, h.add("fix-x", signer=signer))
    assert err.code == "trust-store" and str(h.trusted) in str(err)


def test_forged_manifest_is_refused(harness: KernelHarness, signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    path = h.add("fix-x", signer=signer)
    forge_manifest(path, lambda m: m["functions"].append(dict(m["functions"][0], name="vfs_read")))
    err = signature_refusal(h, path)
    assert err.code == "bad-signature" and "changed after signing" in str(err)


def test_signature_by_another_key_than_the_manifest_names(harness: KernelHarness, signer: Signer,
                                                          other_signer: Signer) -> None:
    from dynamos.update.package import read_package, write_package

    h = harness
    h.use_trust()
    h.trust(signer)
    h.trust(other_signer)
    pkg = read_package(h.add("fix-x", signer=signer))
    from dynamos.update.model import UpdateSource
    from tests.support.harness import fn
    source = UpdateSource(directory=h.packages, name="fix-x", description="x", functions=(fn("cmdline_proc_show"),),
                          c_files=())
    path = write_package(h.packages / "mixed.dynpkg", source=source, kernel_release=pkg.kernel_release,
                         vermagic=pkg.vermagic, module=pkg.module, signer=signer.manifest_signer(),
                         sign=other_signer.sign_manifest)
    assert signature_refusal(h, path).code == "signer-mismatch"


def test_older_package_is_not_replayed(harness: KernelHarness, signer: Signer) -> None:
    h = harness
    h.use_trust()
    h.trust(signer)
    now = datetime.now(UTC)
    old = h.add("fix-x", signer=signer, created=now - timedelta(days=30))
    h.packages.joinpath("old.dynpkg").write_bytes(old.read_bytes())
    h.kernel.apply(h.add("fix-x", signer=signer, created=now))
    h.kernel.revert("fix-x")  # not live any more: the accepted record still says what was newest
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.packages / "old.dynpkg")
    assert [r.code for r in info.value.reasons] == ["older-package"]
    assert "--allow-older" in str(info.value)
    h.use_trust(allow_older=True)
    h.kernel.apply(h.packages / "old.dynpkg")


# --- kernels that check module signatures ------------------------------------------------------


def _keys(h: KernelHarness, *descriptions: str) -> None:
    lines = [f"{i:08x} I------     1 perm 1f010000     0     0 asymmetri {d}: X509.rsa 12345678 []"
             for i, d in enumerate(descriptions, 1)]
    lines.append("0000000f I------     1 perm 1f0b0000     0     0 keyring   .builtin_trusted_keys: 1")
    (h.sim.root / "proc").mkdir(exist_ok=True)
    (h.sim.root / "proc/keys").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("setting, why", [({"sig_enforce": True}, "module.sig_enforce=1"),
                                          ({"lockdown": "integrity"}, "kernel lockdown (integrity)")])
def test_enforcing_kernel_tells_unsigned_from_untrusted(harness: KernelHarness, signer: Signer, setting, why) -> None:
    h = harness
    h.sim.configure(**setting)
    h.use_trust(allow_unsigned=True)
    h.trust(signer)
    _keys(h, "Debian Secure Boot CA: 6ccece7e4c6c0d1f6149f3dd27dfcc5cbb419ea1")
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-x"))
    assert [r.code for r in info.value.reasons] == ["module-unsigned"] and why in str(info.value)
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-x", signer=signer))
    assert [r.code for r in info.value.reasons] == ["module-key-untrusted"]
    assert signer.module_key_id in str(info.value) and "dynamos test signer" in str(info.value)
    assert h.syscalls("init_module") == []
    _keys(h, "Debian Secure Boot CA: 6ccece7e4c6c0d1f6149f3dd27dfcc5cbb419ea1",
          f"dynamos test signer: {signer.module_key_id}")
    h.kernel.apply(h.add("fix-x", signer=signer))
    assert h.kernel.status().updates[0].enabled
