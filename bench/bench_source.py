"""Timings of the kernel source for a target and of single-file compiles in it.

- prepare: cold (``source/<release>`` absent) is timed phase by phase — fetching the tarball
  (installed package, kept .deb or download), extracting it, ``make olddefconfig``, ``make prepare
  modules_prepare`` and the checks; when the tree is already cached it says so (``--cold`` drops
  the cached tree first, not the kept .deb).
- compile: warm ``compile_unit`` of one file, original and patched, median of several runs, against
  a baseline run in the same invocation: the bare compiler + objtool command Kbuild records for
  that object (``.<file>.o.cmd``), i.e. the floor without Kbuild's make overhead.

Usage: python bench/bench_source.py [--runs N] [--file fs/proc/cmdline.c] [--cold] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dynamos.builder.units import compile_unit
from dynamos.target import DEFAULT_LAB_KERNEL, fetch_target
from dynamos.target import source as source_mod
from dynamos.target.make import make_env
from dynamos.target.source import READY, KernelSource, prepare_source, source_root

# Phase of prepare_source named by the start of its progress messages.
_PHASES = (("looking for", "fetch"), ("source package present", "fetch"), ("downloading", "fetch"),
           ("unpacking", "fetch"), ("extracting", "extract"), ("configuring", "olddefconfig"),
           ("preparing", "prepare"), ("kernel source", "done"))


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def timed_prepare(release: str) -> dict[str, float]:
    """Prepare the source, returning seconds per phase (the checks count in the last one)."""
    target = fetch_target(release)
    marks: list[tuple[str, float]] = []
    t0 = time.monotonic()

    def progress(message: str) -> None:
        phase = next((name for prefix, name in _PHASES if message.startswith(prefix)), None)
        if phase and (not marks or marks[-1][0] != phase):
            marks.append((phase, time.monotonic() - t0))

    prepare_source(target, progress)
    total = time.monotonic() - t0
    phases: dict[str, float] = {}
    ends = [start for _name, start in marks[1:]] + [total] if marks else []
    for (name, start), end in zip(marks, ends, strict=True):
        if name != "done":
            phases[name] = round(phases.get(name, 0.0) + end - start, 2)
    phases["setup"] = round(marks[0][1] if marks else total, 2)  # settings, tool checks
    phases["total"] = round(total, 2)
    return phases


def bare_command(source: KernelSource, obj_rel: str) -> str:
    """The compiler + objtool command Kbuild runs for an object, from its ``.cmd`` record."""
    settings = source_mod._with_cflags(source_mod._load_settings(source), source_mod.DEFAULT_EXTRA_CFLAGS)
    obj = source.tree / obj_rel
    with source_mod._tree_lock(source.release):
        try:
            status, log = source_mod._run_make(source_mod._make_command(source.tree, settings, obj_rel),
                                               settings, lambda _m: None, "bench")
            assert status == 0, log
            first = obj.with_name(f".{obj.name}.cmd").read_text().splitlines()[0]
        finally:
            source_mod._remove_object(obj)
    return first.split(":=", 1)[1].strip()


def run_bare(source: KernelSource, command: str, obj_rel: str) -> float:
    obj = source.tree / obj_rel
    with source_mod._tree_lock(source.release):
        t0 = time.monotonic()
        try:
            subprocess.run(["sh", "-c", command], cwd=source.tree, check=True, capture_output=True,
                           env=make_env())
            return time.monotonic() - t0
        finally:
            source_mod._remove_object(obj)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--file", default="fs/proc/cmdline.c")
    ap.add_argument("--release", default=DEFAULT_LAB_KERNEL)
    ap.add_argument("--cold", action="store_true", help="drop the cached tree first and time a cold prepare")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    root = source_root(args.release)
    if args.cold:
        with source_mod._tree_lock(args.release):  # not under a compile that is using the tree
            shutil.rmtree(root, ignore_errors=True)
    cold = not (root / READY).exists()
    phases = timed_prepare(args.release)
    source = prepare_source(fetch_target(args.release))
    results: dict[str, object] = {"prepare": {"cold": cold, **phases} if cold else {"cold": False}}

    obj_rel = str(Path(args.file).with_suffix(".o"))
    original = (source.tree / args.file).read_bytes()
    patched = original + b"\n/* patched by bench_source */\n"
    command = bare_command(source, obj_rel)
    originals, patcheds, bares = [], [], []
    with tempfile.TemporaryDirectory(prefix="dynamos-bench-") as tmp:
        for _ in range(args.runs):  # interleaved, so load changes hit all alike
            originals.append(compile_unit(source, args.file, Path(tmp, "orig.o")).seconds)
            patcheds.append(compile_unit(source, args.file, Path(tmp, "new.o"), text=patched).seconds)
            bares.append(run_bare(source, command, obj_rel))
    results["compile"] = {
        "file": args.file, "runs": args.runs, "original_s": median(originals), "patched_s": median(patcheds),
        "baseline_s": median(bares), "baseline": "bare gcc + objtool command of the object",
        "ratio": round(median(originals) / median(bares), 2),
    }

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if cold:
        shown = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "total")
        print(f"prepare (cold): {phases['total']:.1f} s  [{shown}]")
    else:
        print(f"prepare: warm (tree already cached in {root}); run with --cold to time a cold prepare")
    c = results["compile"]
    assert isinstance(c, dict)
    print(f"compile {c['file']} (median of {c['runs']}): original {c['original_s']:.2f} s, "
          f"patched {c['patched_s']:.2f} s; baseline {c['baseline_s']:.2f} s ({c['baseline']}); "
          f"ratio {c['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
