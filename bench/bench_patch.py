"""Timing of the source-diff builder: a one-file patch to an update package.

- warm: the prepared source tree is cached; median of several builds of the same patch, against
  a baseline run in the same invocation: compiling that one file once with the kernel's own
  build system (``make <file>.o`` in the tree), the least any source-based builder must pay.
- cold (``--cold``): the cached tree is dropped first (the source package stays), so the build
  pays extraction and ``make prepare modules_prepare`` too.

Usage: python bench/bench_patch.py [--runs N] [--cold] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _report import print_results  # bench/, on the path when a bench script runs

from dynamos.builder.patch import build_from_patch
from dynamos.builder.units import compile_unit
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import DEFAULT_LAB_KERNEL, fetch_target
from dynamos.target.source import prepare_source, source_root

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "tests" / "lab" / "patches" / "proc-cmdline-string.patch"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    lab_symbol_table(target)  # the lab's symbol table is cached once per kernel, not per build
    out = Path(tempfile.mkdtemp(prefix="dynamos-bench-"))
    results: dict[str, object] = {}
    if args.cold:
        shutil.rmtree(source_root(target.release), ignore_errors=True)
        t0 = time.monotonic()
        build_from_patch(PATCH, target, output=out, name="bench-cold")
        results["cold_s"] = round(time.monotonic() - t0, 2)
    source = prepare_source(target)
    warm, base = [], []
    for _ in range(args.runs):
        t0 = time.monotonic()
        build_from_patch(PATCH, target, output=out, name="bench-warm")
        warm.append(time.monotonic() - t0)
        base.append(compile_unit(source, "fs/proc/cmdline.o", out / "base.o").seconds)
    results.update(warm_s=round(statistics.median(warm), 2), baseline_one_compile_s=round(statistics.median(base), 2),
                   ratio=round(statistics.median(warm) / statistics.median(base), 2), runs=args.runs)
    shutil.rmtree(out, ignore_errors=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
