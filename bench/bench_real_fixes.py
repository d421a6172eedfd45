"""Coverage of Debian's own kernel revisions by ``build --to`` (issue 10, item 7): per pair of
consecutive revisions, files changed, built by the config, carried, refused by reason code, the
time of ``build --to``, and whether the update loads in the lab and its transition finishes.

The two security revision pairs the archive has images for: 6.1.192-1 -> 6.1.192-2 on
6.1.0-55-amd64 and 6.1.192-2 -> 6.1.192-3 on 6.1.0-56-amd64. The stable point release
6.1.190-1 -> 6.1.192-1 (6.1.0-54, ~1,900 files) is not here yet: its build alone would take hours on
two cores. "Changed code ran" is not measured here; tests/lab/test_debian_revisions_lab.py proves
it for both revisions (the update's functions traced serving an ext4 loop mount and an NFSv4.1
mount).

Usage: python bench/bench_real_fixes.py [--cold] [--json]   (boots a lab: run under the lab lock)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _report import print_results  # bench/, on the path when a bench script runs

from dynamos.builder.debian import CARRIED, NOT_BUILT, REFUSED, build_to
from dynamos.demo import guest_env
from dynamos.lab import Lab, LabConfig
from dynamos.target import cache_root, fetch_target
from dynamos.target.source import source_package
from dynamos.update.package import read_package

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("6.1.0-55-amd64", "6.1.192-2"), ("6.1.0-56-amd64", "6.1.192-3")]


def forget_to_version(release: str, to: str) -> None:
    """A cold --to: its .deb and extracted tree gone (the running version's prepared tree stays)."""
    package = source_package(release)
    shutil.rmtree(cache_root() / "versions" / package / to, ignore_errors=True)
    (cache_root() / "debs" / f"{package}_{to}_all.deb").unlink(missing_ok=True)


def loads_in_lab(release: str, package_path: Path) -> dict[str, object]:
    """Apply the update in a lab with every module it patches loaded first; revert it."""
    pkg = read_package(package_path)
    modules = sorted({f.object for f in pkg.patched_functions} - {"vmlinux"})
    lab = Lab.boot(LabConfig(kernel=release, shares=[str(REPO), str(cache_root())]))
    cli = [sys.executable, "-m", "dynamos"]
    trouble: list[str] = []
    try:
        for module in modules:
            trouble += lab.run(["modprobe", module], timeout=120).kernel_messages
        r = lab.run([*cli, "apply", str(package_path), "--json"], env=guest_env(), timeout=180)
        trouble += r.kernel_messages
        applied = r.status == 0
        out: dict[str, object] = {"loaded": applied, "modules_loaded_first": modules}
        if applied:
            name = pkg.livepatch_name
            out["transition_finished"] = lab.run(["cat", f"/sys/kernel/livepatch/{name}/transition"]
                                                 ).stdout.decode().strip() == "0"
            r = lab.run([*cli, "revert", pkg.name], env=guest_env(), timeout=180)
            out["reverted"] = r.status == 0
            trouble += r.kernel_messages
        else:
            out["error"] = r.stdout.decode()[-500:] + r.stderr.decode()[-500:]
        out["kernel_messages"] = trouble
        return out
    finally:
        lab.kill()
        lab.discard()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", action="store_true", help="forget the --to version's download and tree first")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out_dir = cache_root() / "packages"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    for release, to in PAIRS:
        target = fetch_target(release)
        if args.cold:
            forget_to_version(release, to)
        t0 = time.monotonic()
        build = build_to(target, to, output=out_dir)
        seconds = round(time.monotonic() - t0, 1)
        refused: dict[str, int] = {}
        for f in build.files:
            if f.status == REFUSED:
                refused[f.code] = refused.get(f.code, 0) + 1
        row: dict[str, object] = {
            "files_changed": len(build.files),
            "built_by_config": sum(f.status != NOT_BUILT for f in build.files),
            "carried_built": sum(f.status == CARRIED for f in build.files),
            "refused": refused,
            "build_to_s": seconds,
            "cold": args.cold,
        }
        if build.package_path is not None:
            row["lab"] = loads_in_lab(release, build.package_path)
        row["changed_code_ran"] = "see tests/lab/test_debian_revisions_lab.py"
        results[f"{build.from_version}->{to} on {release}"] = row
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
