"""Timings of the spine on the default lab kernel: lab boot, build, apply, revert.

Prints medians of several runs and ratios to a baseline measured in the same invocation:
- boot-to-command: dynamos' PVH boot of vmlinux vs the conventional boot of the compressed
  vmlinuz through firmware, same initramfs and agent (both until the first command returns);
- build: ``dynamos build`` of examples/cmdline-banner vs a bare Kbuild of a trivial module
  against the same headers (the floor any module build pays);
- apply/revert: the ``dynamos`` CLI in the guest vs starting the same CLI for ``--version``
  (the guest's interpreter start-up, paid by every command).

Usage: python bench/bench_spine.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynamos.builder.kbuild import build_update
from dynamos.demo import guest_env
from dynamos.lab import Lab, LabConfig
from dynamos.lab import machine as labmachine
from dynamos.lab import vm as labvm
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target
from dynamos.target.images import extract_vmlinux

REPO = Path(__file__).resolve().parents[1]


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def boot_to_command(config: LabConfig, image: str) -> float:
    """Seconds from starting QEMU until a first command's result is back on the host."""
    original = labmachine.extract_vmlinux
    if image == "vmlinuz":
        labmachine.extract_vmlinux = lambda target: target.image  # the conventional path
    try:
        t0 = time.monotonic()
        lab = Lab.boot(config)
        r = lab.run(["true"], timeout=30)
        seconds = time.monotonic() - t0
        assert r.status == 0
        lab.kill()
        lab.discard()
        return seconds
    finally:
        labmachine.extract_vmlinux = original


def bare_kbuild(headers: Path) -> float:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "hello.c").write_text('#include <linux/module.h>\nMODULE_LICENSE("GPL");\n')
        Path(d, "Kbuild").write_text("obj-m := hello.o\n")
        t0 = time.monotonic()
        subprocess.run(["make", "-s", "-C", str(headers), f"M={d}", "modules"], check=True, capture_output=True)
        return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    extract_vmlinux(target)
    config = LabConfig(kernel=target.release, shares=[str(REPO), str(cache_root())])
    config.accel = labvm.choose_accel(target)
    results: dict[str, dict] = {}

    boots = {img: [] for img in ("vmlinux", "vmlinuz")}
    for _ in range(args.runs):
        for img in boots:  # interleaved, so load changes hit both alike
            boots[img].append(boot_to_command(config, img))
    results["boot_to_command"] = {"dynamos_s": median(boots["vmlinux"]), "baseline_s": median(boots["vmlinuz"]),
                                  "baseline": "firmware boot of compressed vmlinuz", "accel": config.accel}

    out = cache_root() / "packages"
    out.mkdir(parents=True, exist_ok=True)
    builds, bares = [], []
    for _ in range(args.runs):
        builds.append(build_update(REPO / "examples" / "cmdline-banner", target, output=out).seconds)
        bares.append(bare_kbuild(target.headers_dir))
    pkg = out / f"cmdline-banner_{target.release}.dynpkg"
    results["build"] = {"dynamos_s": median(builds), "baseline_s": median(bares),
                        "baseline": "bare Kbuild of a trivial module"}

    lab = Lab.boot(config)
    cli = [sys.executable, "-m", "dynamos"]
    applies, reverts, starts, transitions = [], [], [], []
    try:
        for _ in range(args.runs):
            r = lab.run([*cli, "--version"], env=guest_env(), timeout=60)
            starts.append(r.seconds)
            r = lab.run([*cli, "apply", str(pkg), "--json"], env=guest_env(), timeout=120)
            assert r.status == 0, r.stderr
            applies.append(r.seconds)
            transitions.append(json.loads(r.stdout)["phases"]["transition"])
            r = lab.run([*cli, "revert", "cmdline-banner"], env=guest_env(), timeout=120)
            assert r.status == 0, r.stderr
            reverts.append(r.seconds)
    finally:
        lab.kill()
        lab.discard()
    results["apply"] = {"dynamos_s": median(applies), "baseline_s": median(starts),
                        "transition_s": median(transitions), "baseline": "guest CLI start-up (--version)"}
    results["revert"] = {"dynamos_s": median(reverts), "baseline_s": median(starts),
                         "baseline": "guest CLI start-up (--version)"}
    for r in results.values():
        r["ratio"] = round(r["dynamos_s"] / r["baseline_s"], 2)
        r["runs"] = args.runs

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'measure':<18}{'dynamos s':>10}{'baseline s':>12}{'ratio':>8}  baseline")
        for k, r in results.items():
            print(f"{k:<18}{r['dynamos_s']:>10.2f}{r['baseline_s']:>12.2f}{r['ratio']:>8.2f}  {r['baseline']}")
        print(f"(median of {args.runs} runs; accelerator {config.accel}; apply's transition alone: "
              f"{results['apply']['transition_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
