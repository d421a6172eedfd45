"""The conventional cost the source-diff builder avoids: a full kernel build on this machine.

kpatch-build and upstream klp-build compile the whole kernel (original and patched) to find what
a patch changed; dynamos compiles the files the patch touches. This times one ``make vmlinux``
(``--goal all``: modules too) from a clean copy of the same prepared tree, with the same config,
compiler, flags and job count dynamos uses, against dynamos building the one-file lab patch
(warm, median of ``--runs``) in the same invocation, and prints the ratio. It takes tens of
minutes on 2 cores; ``--progress`` shows the Kbuild steps.

Usage: python bench/bench_full_build.py [--goal vmlinux|all] [--runs N] [--json] [--progress]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import print_results  # bench/, on the path when a bench script runs

from dynamos.builder.patch import build_from_patch
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import DEFAULT_LAB_KERNEL, fetch_target
from dynamos.target.source import load_settings, make_command, prepare_source, run_make

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "tests" / "lab" / "patches" / "proc-cmdline-string.patch"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--goal", choices=("vmlinux", "all"), default="vmlinux")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    lab_symbol_table(target)
    source = prepare_source(target)
    settings = load_settings(source)
    scratch = Path(tempfile.mkdtemp(prefix="dynamos-fullbuild-"))
    try:
        out = scratch / "packages"
        out.mkdir()
        warm = []
        for _ in range(args.runs):
            t0 = time.monotonic()
            build_from_patch(PATCH, target, output=out, name="bench-warm")
            warm.append(time.monotonic() - t0)
        tree = scratch / source.tree.name
        subprocess.run(["cp", "-a", str(source.tree), str(tree)], check=True)
        # Debian's config signs modules with a key its own build supplies: a throwaway one, made
        # as the kernel's certs/Makefile makes its default key, takes its place (code is unchanged).
        key = tree / "output" / "signing_key.pem"
        key.parent.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500", "-batch", "-x509",
                        "-config", str(tree / "certs" / "default_x509.genkey"), "-outform", "PEM",
                        "-out", str(key), "-keyout", str(key)], check=True, capture_output=True)
        count = 0

        def step(line: str) -> None:
            nonlocal count
            count += 1
            if args.progress and count % 100 == 0:
                print(f"[{time.monotonic() - t0:7.0f}s] {count} steps: {line}", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        status, log = run_make(make_command(tree, settings, args.goal), settings, step, "full build")
        full = time.monotonic() - t0
        if status != 0:
            print(log[-4000:], file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {"goal": args.goal, "full_build_s": round(full, 1), "kbuild_steps": count,
               "dynamos_warm_s": round(statistics.median(warm), 2), "runs": args.runs,
               "ratio_full_to_dynamos": round(full / statistics.median(warm), 1)}
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
