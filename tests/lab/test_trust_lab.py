"""Signed packages on the real kernel: the lab trusts its own key inside the guest; everything else
is refused before the kernel sees it, and says why."""

from __future__ import annotations

import json
import tarfile

from dynamos.builder.kbuild import build_update
from dynamos.builder.signing import new_signer
from dynamos.errors import PackageError
from tests.lab.test_live_updates import EXAMPLES
from tests.support.forgery import forge_manifest


def test_lab_key_is_trusted_in_the_guest_and_status_names_it(guest, build):
    pkg = build(EXAMPLES / "cmdline-banner")
    assert guest.sh("ls /run/dynamos-trusted").split() == ["lab.gpg"]
    applied = json.loads(guest.dynamos("apply", str(pkg), "--json").stdout)
    assert applied["name"] == "cmdline-banner"
    (update,) = guest.status()["updates"]
    assert update["signer"]["name"].startswith("dynamos lab key")
    assert len(update["signer"]["fingerprint"]) == 40
    guest.dynamos("revert", "cmdline-banner")


def test_forged_unsigned_and_stranger_packages_are_refused(guest, build, workdir, target):
    pkg = build(EXAMPLES / "cmdline-banner")
    before = guest.read("/proc/cmdline")

    forged = workdir / "forged.dynpkg"
    forge_manifest(pkg, lambda m: m.update(description="harmless, honest"), out=forged)
    r = guest.dynamos("apply", str(forged), check=False)
    assert r.status == PackageError.exit_status and "changed after signing" in r.stderr.decode()

    unsigned = workdir / "unsigned.dynpkg"
    with tarfile.open(pkg) as tar, tarfile.open(unsigned, "w", format=tarfile.USTAR_FORMAT) as out:
        for m in tar.getmembers():
            if m.name != "manifest.sig":
                out.addfile(m, tar.extractfile(m))
    r = guest.dynamos("apply", str(unsigned), check=False)
    assert r.status == PackageError.exit_status and "not signed" in r.stderr.decode()

    stranger = new_signer(workdir / "stranger", "Mallory's fixes")
    strange = workdir / "stranger-pkg"
    strange.mkdir()
    strange_pkg = build_update(EXAMPLES / "cmdline-banner", target, output=strange, signer=stranger).package_path
    r = guest.dynamos("apply", str(strange_pkg), check=False)
    assert r.status == PackageError.exit_status
    assert "Mallory's fixes" in r.stderr.decode() and stranger.fingerprint[-16:] in r.stderr.decode()
    assert guest.livepatches() == [] and guest.read("/proc/cmdline") == before

    # Development escape hatch: explicit, warned, and status says the package was unsigned.
    r = guest.dynamos("apply", str(unsigned), "--allow-unsigned")
    assert "--allow-unsigned" in r.stderr.decode() and "warning" in r.stderr.decode()
    assert guest.status()["updates"][0]["signer"]["fingerprint"] == ""
    guest.dynamos("revert", "cmdline-banner")
