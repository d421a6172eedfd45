"""Stress on two vCPUs: 100 apply/revert cycles mixing per-task, global, multi-edition and
shadow-data updates under CPU and syscall load (tests/lab/programs/stress_cycles.py, looping in
the guest), counting oopses/WARNs/RCU stalls, leaked modules and shadow variables.

With ``--compare-single`` the same cycles run a second time in a lab whose two vCPUs share one
host thread (QEMU's ``-accel tcg,thread=single``): the baseline that tells a stall of QEMU's
multi-threaded TCG from one of dynamos or the kernel (the guest code is the same; only QEMU's
execution of it differs).

Usage: python bench/bench_stress.py [--cycles N] [--compare-single] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_results  # noqa: E402

from dynamos.builder.kbuild import build_update  # noqa: E402
from dynamos.demo import guest_env  # noqa: E402
from dynamos.lab import Lab, LabConfig  # noqa: E402
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROGRAM = REPO / "tests/lab/programs/stress_cycles.py"
SOURCES = [REPO / "examples/cmdline-banner", REPO / "tests/lab/updates/pipe-read-global",
           REPO / "examples/cmdline-editions", REPO / "examples/pipe-bytes"]


def run_cycles(packages: list[Path], cycles: int, threads: str, work: Path) -> dict:
    config = LabConfig(kernel=DEFAULT_LAB_KERNEL, cpus=2, shares=[str(REPO), str(cache_root()), str(work)],
                       tcg_threads=threads, accel="tcg")
    lab = Lab.boot(config, progress=lambda m: print(f"[{threads}] {m}", file=sys.stderr))
    try:
        r = lab.run([sys.executable, str(PROGRAM), str(cycles), *map(str, packages)], env=guest_env(),
                    timeout=cycles * 120)
        report = json.loads(r.stdout) if r.status == 0 else {"failures": [r.stderr.decode()[-2000:]], "cycles": 0}
        report["lab_kernel_trouble"] = r.kernel_messages
    finally:
        lab.kill()
        lab.discard()
    return report


def summary(report: dict) -> dict:
    return {"cycles": report.get("cycles"), "failures": len(report.get("failures", [])),
            "kernel_trouble_lines": len(report.get("lab_kernel_trouble", [])),
            "total_s": report.get("total_seconds"),
            "median_cycle_s": {k: round(statistics.median(v), 2) for k, v in report.get("seconds", {}).items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--compare-single", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = [build_update(s, target, output=work).package_path for s in SOURCES]
        results = {"multi": run_cycles(packages, args.cycles, "multi", work)}
        if args.compare_single:
            results["single"] = run_cycles(packages, args.cycles, "single", work)
    out = {mode: summary(r) for mode, r in results.items()}
    out["failure_details"] = {mode: r.get("failures", [])[:10] for mode, r in results.items()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_results({f"{m}.{k}": v for m, s in out.items() if m != "failure_details" for k, v in s.items()}, False)
        for mode, failures in out["failure_details"].items():
            for f in failures:
                print(f"{mode} failure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
