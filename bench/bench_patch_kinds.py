"""Timing of the source-diff builder on the patch shapes beyond one plain .c file.

Each patch in bench/patches is built warm (prepared tree cached) several times; the baseline,
run in the same invocation, is one compile of every unit the patch reaches with the kernel's own
build system: what any source-based builder pays at least once.

- sched-debug-included: kernel/sched/debug.c, which 6.1 compiles inside build_utility.c;
- fdinfo-local-header: fs/proc/fd.h (included by base.c and fd.c) and fd.c;
- md-module-twin: drivers/md/md.c of md-mod.ko, checked against the shipped module.

Usage: python bench/bench_patch_kinds.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _report import print_results  # bench/, on the path when a bench script runs

from dynamos.builder.patch import build_from_patch, touched_files, translation_units_of
from dynamos.builder.units import compile_unit
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import DEFAULT_LAB_KERNEL, fetch_target
from dynamos.target.source import prepare_source

PATCHES = Path(__file__).resolve().parent / "patches"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    lab_symbol_table(target)
    source = prepare_source(target)
    out = Path(tempfile.mkdtemp(prefix="dynamos-bench-"))
    results: dict[str, object] = {"runs": args.runs}
    for patch in sorted(PATCHES.glob("*.patch")):
        units = sorted({u for rel in touched_files(patch.read_text()) for u in translation_units_of(source.tree, rel)})
        builds, base = [], []
        for _ in range(args.runs):
            t0 = time.monotonic()
            build_from_patch(patch, target, output=out, name=f"bench-{patch.stem}")
            builds.append(time.monotonic() - t0)
            base.append(sum(compile_unit(source, u, out / "base.o").seconds for u in units))
        build_s, base_s = statistics.median(builds), statistics.median(base)
        results[patch.stem] = {"units": units, "build_s": round(build_s, 2), "baseline_compiles_s": round(base_s, 2),
                               "ratio": round(build_s / base_s, 2)}
    shutil.rmtree(out, ignore_errors=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
