"""Coverage of Debian's own kernel revisions by ``build --to`` (issue 10, item 7): per pair of
consecutive revisions, files changed, built by the config, carried, refused by reason code, the
time of ``build --to``, and whether the update loads in the lab and its transition finishes.

The two security revision pairs the archive has images for: 6.1.192-1 -> 6.1.192-2 on
6.1.0-55-amd64 and 6.1.192-2 -> 6.1.192-3 on 6.1.0-56-amd64 (the whole revision is built).
"Changed code ran" is not measured here; tests/lab/test_debian_revisions_lab.py proves it for both
revisions (the update's functions traced serving an ext4 loop mount and an NFSv4.1 mount).

``--stable``: the stable point release 6.1.190-1 -> 6.1.192-1 on 6.1.0-54-amd64 (~1,900 files).
Building all of it takes hours on two cores, so this is a *sample*: every changed file is
classified without compiling (path rules, the config, headers' reach through the include graph),
then one cumulative update is built from a seeded random sample of ``--sample`` changed ``.c``
files that the config builds, loaded in a lab (the modules it patches loaded first), its
transition checked, and reverted. A file counts for the target when it is carried (and the update
loads) or refused with a code of ``ACCEPTED_CODES``; the fraction is printed with a 95 % Wilson
interval, which is what a sample can say about the release. When the update does not load, the
sample's carried files are bisected (rebuilt by halves) to name the file(s) that stop it; when
the update does not even link (modpost), the files naming the symbol it complains about are counted
against the target and the rest rebuilt. Each sampled file is built with the changed headers the
whole release would carry into its units and those its units read (their original compiles'
dependency lists: an -I include the static graph cannot follow), and with the release's files
that add a global function its change starts to use (``--without-headers``: alone), so it
compiles as it would in the release. The last measurement is in README.md (``build --to`` section).

Usage: python bench/bench_real_fixes.py [--cold] [--json]   (boots a lab: run under the lab lock)
       python bench/bench_real_fixes.py --stable [--sample N] [--seed S] [--max-units M]
           [--lab-lock /tmp/dynamos-lab.lock] [--json]
       (``--lab-lock`` takes the lock around each lab boot only, so the long build does not hold
       it; do not combine it with an outer ``flock`` on the same file)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _report import print_results  # bench/, on the path when a bench script runs

from dynamos.builder.debian import (
    ACCEPTED_CODES,
    CARRIED,
    DEFAULT_MAX_UNITS,
    NOT_BUILT,
    REFUSED,
    Change,
    FileResult,
    IncludeGraph,
    build_changes,
    build_to,
    built_by_config,
    changed_files,
    path_refusal,
    version_tree,
)
from dynamos.builder.units import compile_original
from dynamos.builder.unitsof import translation_units_of
from dynamos.demo import guest_env
from dynamos.errors import BuildError
from dynamos.lab import Lab, LabConfig
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import TargetKernel, cache_root, fetch_target
from dynamos.target.fetch import debian_version
from dynamos.target.source import prepare_source, read_config, source_package, tree_lock
from dynamos.target.symtab import kallsyms_path
from dynamos.update.package import read_package

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("6.1.0-55-amd64", "6.1.192-2"), ("6.1.0-56-amd64", "6.1.192-3")]
STABLE = ("6.1.0-54-amd64", "6.1.192-1")  # runs 6.1.190-1


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


# --------------------------------------------------------------------------------------------------
# The stable point release: classified whole, built from a sample


LOCK_WAITS: list[float] = []  # seconds spent waiting for the lab lock: not the lab's time


@contextlib.contextmanager
def lab_lock(path: str | None) -> Iterator[None]:
    """The lab lock around one lab boot (none when the caller holds it from outside)."""
    if path is None:
        yield
        return
    with open(path, "w") as f:
        t = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        LOCK_WAITS.append(time.monotonic() - t)
        yield


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion: honest near 100 % and for small samples,
    where the normal approximation claims more than a sample can say."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def classify_release(target: TargetKernel, running: str, to: str, max_units: int,
                     say: Callable[[str], None]) -> tuple[dict[str, object], list[str], dict[str, list[str]],
                                                          dict[str, str]]:
    """Every changed file of the release classified without compiling, with the same rules as
    ``build_changes``: the counts, the population of changed .c files the config builds (or whose
    build the Makefile leaves to Kbuild), per unit the changed headers it includes, and per changed
    header what the whole release's build does with it ("carried": compiled into its units, where
    the build judges a layout change unit by unit)."""
    source = prepare_source(target, say)
    newer = version_tree(source_package(target.release), to, say)
    with tree_lock(target.release, shared=True):
        changes = changed_files(source.tree, newer.tree,
                                newer.tree.parent / f"diff-from-{running}-{target.release}.json", say)
    config = read_config(source.tree / ".config")
    graph = IncludeGraph.scan(source.tree, say)
    kinds = {"modified": 0, "added": 0, "removed": 0}
    by_path: dict[str, int] = {}
    c_files = {"modified": 0, "added": 0, "removed": 0, "modified_built": 0, "modified_build_decides": 0,
               "modified_not_built": 0, "modified_other_arch": 0, "added_or_removed_built": 0}
    h_files: dict[str, object] = {"modified": 0, "added": 0, "removed": 0,
                                  "no_unit": 0, "within_max_units": 0, "over_max_units": 0}
    reach: list[tuple[int, str]] = []
    population: list[str] = []
    added_removed_built: list[str] = []
    headers_of_unit: dict[str, list[str]] = {}
    header_status: dict[str, str] = {}
    other = 0
    for ch in changes:
        kinds[ch.kind] += 1
        decided = path_refusal(ch.path)
        if decided is not None:
            by_path[decided[1]] = by_path.get(decided[1], 0) + 1
            continue
        if ch.path.endswith(".c"):
            c_files[ch.kind] += 1
            if ch.kind != "modified":  # refused by build --to without compiling (added-file / removed-file)
                tree = newer.tree if ch.kind == "added" else source.tree
                other_arch = ch.path.startswith("arch/") and not ch.path.startswith("arch/x86/")
                if not other_arch and built_by_config(tree, ch.path, config, target):
                    c_files["added_or_removed_built"] += 1
                    added_removed_built.append(f"{ch.path} ({ch.kind})")
                continue
            if ch.path.startswith("arch/") and not ch.path.startswith("arch/x86/"):
                # built_by_config reads only the directory's Makefile: obj-y there says True
                c_files["modified_other_arch"] += 1
                continue
            verdicts = [built_by_config(source.tree, u, config, target)
                        for u in translation_units_of(source.tree, ch.path)]
            if any(v is True for v in verdicts):
                c_files["modified_built"] += 1
                population.append(ch.path)
            elif all(v is False for v in verdicts):
                c_files["modified_not_built"] += 1
            else:
                c_files["modified_build_decides"] += 1
                population.append(ch.path)
        elif ch.path.endswith(".h"):
            h_files[ch.kind] = int(h_files[ch.kind]) + 1  # type: ignore[call-overload]
            if ch.kind != "modified":
                continue
            # whether it changes a layout is told per unit by the build (builder/elf/types.py)
            # the include graph for every header: the builder greps the tree for a header outside
            # include/ (same includers by relative path), a whole-tree grep per header, minutes here
            units = graph.units(ch.path)
            for u in units:
                headers_of_unit.setdefault(u, []).append(ch.path)
            key = "no_unit" if not units else "over_max_units" if len(units) > max_units else "within_max_units"
            header_status[ch.path] = {"no_unit": "no unit", "over_max_units": f"header-reach {len(units)}",
                                      "within_max_units": "carried"}[key]
            h_files[key] = int(h_files[key]) + 1  # type: ignore[call-overload]
            reach.append((len(units), ch.path))
        else:
            other += 1
    reach.sort(reverse=True)
    h_files["largest_reach"] = [f"{p}: {n} units" for n, p in reach[:5]]
    summary: dict[str, object] = {
        "files_changed": len(changes), "by_change": kinds, "refused_or_skipped_by_path": by_path,
        "c_files": c_files, "c_added_or_removed_built": added_removed_built,
        "headers": h_files, "headers_max_units": max_units, "other_files": other,
        "sample_population": len(population),
    }
    return summary, sorted(population), headers_of_unit, header_status


def build_sample(target: TargetKernel, running: str, to: str, files: list[str], max_units: int,
                 say: Callable[[str], None]):  # -> ToBuild
    """One cumulative update of ``files`` (changed .c files), as ``build --to`` builds the release."""
    newer = cache_root() / "versions" / source_package(target.release) / to / source_package(target.release)
    out = cache_root() / "packages" / f"bench-stable-{os.getpid()}"  # two runs do not overwrite each other's
    out.mkdir(parents=True, exist_ok=True)
    return build_changes(target, running, to, [Change(p, "modified") for p in files],
                         lambda rel: (newer / rel).read_bytes(), [], output=out,
                         max_units=max_units, progress=say)


def carried_headers(files: list[str], tree: Path, headers_of_unit: dict[str, list[str]],
                    header_status: dict[str, str]) -> list[str]:
    """The changed headers of the whole release that the units of ``files`` include, as its build
    has them: those it carries into their units, and those it refuses for their reach, which it
    holds back for a unit whose patched compile needs one. Built with them, a sampled file compiles
    as it would in the release's build."""
    return sorted({h for f in files for u in translation_units_of(tree, f) for h in headers_of_unit.get(u, [])
                   if header_status.get(h) == "carried" or header_status.get(h, "").startswith("header-reach")})


_DEFINITION = re.compile(r"^(?!static\b)[A-Za-z_][\w \t*]*?\b([A-Za-z_]\w*)\s*\([^;]*$", re.M)
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


def helper_files(sample: list[str], population: list[str], old: Path, new: Path) -> dict[str, list[str]]:
    """Per sampled file, the release's other changed files that add a global function its change
    starts to use (drivers/base/core.c's device_for_each_child_reverse_from for cxl's hdm.c): the
    whole release's build has them, so the sample's build takes them too (not counted)."""
    def texts(rel: str) -> tuple[str, str]:
        return (old / rel).read_text(errors="replace"), (new / rel).read_text(errors="replace")
    adds: dict[str, str] = {}
    for rel in population:
        if rel not in sample:
            before, after = texts(rel)
            for name in set(_DEFINITION.findall(after)) - set(_DEFINITION.findall(before)):
                adds.setdefault(name, rel)
    out: dict[str, list[str]] = {}
    for rel in sample:
        before, after = texts(rel)
        used = set(_WORD.findall(after)) - set(_WORD.findall(before))
        found = sorted({adds[w] for w in used if w in adds})
        if found:
            out[rel] = found
    return out


def lab_ok(lab: dict[str, object]) -> bool:
    return bool(lab.get("loaded") and lab.get("transition_finished") and lab.get("reverted"))


def bisect_load(target: TargetKernel, running: str, to: str, files: list[str], max_units: int, lock: str | None,
                deadline: float, headers: Callable[[list[str]], list[str]], say: Callable[[str], None],
                steps: list[dict[str, object]]) -> list[str] | None:
    """The files among ``files`` whose update does not load (or whose transition does not
    finish), by rebuilding halves (each with the headers ``headers`` gives it); None when the
    time budget ran out first."""
    def works(subset: list[str]) -> bool | None:
        if time.monotonic() > deadline:
            return None
        t = time.monotonic()
        build = build_sample(target, running, to, subset + headers(subset), max_units, say)
        if build.package_path is None:
            steps.append({"files": subset, "package": None, "seconds": round(time.monotonic() - t, 1)})
            return True
        with lab_lock(lock):
            lab = loads_in_lab(target.release, build.package_path)
        ok = lab_ok(lab)
        steps.append({"files": subset, "ok": ok, "error": lab.get("error", ""),
                      "kernel_messages": lab.get("kernel_messages", []), "seconds": round(time.monotonic() - t, 1)})
        say(f"bisect: {len(subset)} file(s): {'loads' if ok else 'does not load'}")
        return ok

    def search(subset: list[str], known_bad: bool) -> list[str] | None:
        if not known_bad:
            ok = works(subset)
            if ok is None:
                return None
            if ok:
                return []
        if len(subset) == 1:
            return subset
        half = len(subset) // 2
        left = search(subset[:half], False)
        if left is None:
            return None
        right = search(subset[half:], False)
        if right is None:
            return None
        return left + right if left or right else subset  # only together: the whole group
    return search(files, True)


def stable_release(sample_size: int, seed: int, max_units: int, lock: str | None, bisect_minutes: float,
                   with_headers: bool, leave_out: dict[str, str], say: Callable[[str], None]) -> dict[str, object]:
    """Issue 10's stable target, measured on a seeded sample (see the module docstring)."""
    release, to = STABLE
    phases: dict[str, float] = {}
    t = time.monotonic()
    target = fetch_target(release)
    running = debian_version(target)
    prepare_source(target, say)
    if not kallsyms_path(target).is_file():
        with lab_lock(lock):  # the builder reads the target's symbols from a lab once
            lab_symbol_table(target, progress=say)
    phases["prepare"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    summary, population, headers_of_unit, header_status = classify_release(target, running, to, max_units, say)
    phases["classify"] = round(time.monotonic() - t, 1)

    sample = sorted(random.Random(seed).sample(population, min(sample_size, len(population))))
    say(f"sample of {len(sample)} of {len(population)} changed .c files (seed {seed})")
    source = prepare_source(target, say)
    tree = source.tree

    newer = version_tree(source_package(target.release), to, say).tree
    helpers = helper_files(sample, population, tree, newer)
    say(f"with {sum(map(len, helpers.values()))} other changed file(s) adding functions the sample calls")

    changed_headers = set(header_status)
    scratch = cache_root() / "builds" / "bench-originals"  # a copy of each original, removed once read
    scratch.mkdir(parents=True, exist_ok=True)

    def read_by(files: list[str]) -> set[str]:
        """The changed headers the units of ``files`` read, from their original compiles'
        dependency lists (cached; the build compiles them anyway): an -I include ("cxlmem.h" in
        drivers/cxl/core/) is one the static graph cannot follow, and the release's build holds
        such a header back for the units that need it."""
        found: set[str] = set()
        for f in files:
            for u in translation_units_of(tree, f):
                try:
                    original = compile_original(source, u.removesuffix(".c") + ".o", scratch)
                except BuildError:
                    continue
                original.object_path.unlink()  # only its dependency list is wanted here
                found |= changed_headers & set(original.deps or ())
        return found

    def headers(files: list[str]) -> list[str]:
        """What else a build of ``files`` takes: helper files, and the changed headers."""
        more = sorted({h for f in files for h in helpers.get(f, []) if h not in files})
        if not with_headers:
            return more
        carried = carried_headers(files + more, tree, headers_of_unit, header_status)
        return more + sorted(set(carried) | read_by(files + more))
    sample_headers = headers(sample)
    say(f"with {len(sample_headers)} changed header(s) and helper file(s) the release carries into their units")
    t = time.monotonic()
    # files whose update as a whole fails to link (the builder's tolerant mode covers units, not
    # the module's final link): named from modpost's message, left out, and the rest rebuilt
    update_failed = {p: f"left out (--leave-out): {why}" for p, why in leave_out.items() if p in sample}
    build_attempts: list[dict[str, object]] = []
    while True:
        files = [p for p in sample if p not in update_failed]
        try:
            build = build_sample(target, running, to, files + headers(files), max_units, say)
            break
        except BuildError as e:
            message = str(e)
            symbols = sorted(set(re.findall(r"uses symbol (\S+) from namespace", message)))
            blamed = [p for p in files if any(re.search(rf"\b{re.escape(sym)}\b", (newer / p).read_text(
                errors="replace")) for sym in symbols)]
            build_attempts.append({"files": len(files), "error": message[:2000], "blamed": blamed,
                                   "seconds": round(time.monotonic() - t, 1)})
            if not blamed:
                raise
            say(f"the update does not link; left out and rebuilt without: {', '.join(blamed)}")
            for p in blamed:
                update_failed[p] = ("the whole update failed to link while it held this file: "
                                    + next((ln for ln in message.splitlines() if "ERROR" in ln), message[:300]))
    phases["build"] = round(time.monotonic() - t, 1)
    by_path = {f.path: f for f in build.files}
    for p, why in update_failed.items():
        by_path[p] = FileResult(p, "modified", REFUSED, "update-link-failed", why)

    lab: dict[str, object] = {"loaded": None, "note": "no package: nothing carried"}
    if build.package_path is not None:
        with lab_lock(lock):
            t = time.monotonic()
            lab = loads_in_lab(release, build.package_path)
            phases["lab"] = round(time.monotonic() - t, 1)
    carried = [p for p in sample if by_path[p].status == CARRIED]
    culprits: list[str] = []
    bisect: dict[str, object] = {}
    if build.package_path is not None and not lab_ok(lab):
        t = time.monotonic()
        steps: list[dict[str, object]] = []
        found = bisect_load(target, running, to, carried, max_units, lock,
                            time.monotonic() + bisect_minutes * 60, headers, say, steps)
        phases["bisect"] = round(time.monotonic() - t, 1)  # lock waits included
        bisect = {"culprits": found, "complete": found is not None, "steps": steps}
        culprits = carried if found is None else found
    phases["lab_lock_wait"] = round(sum(LOCK_WAITS), 1)

    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    against: list[str] = []
    for p in sample:
        f = by_path[p]
        units = f.units or [p]
        changed_headers = sorted({h for u in units for h in headers_of_unit.get(u, [])})
        not_in_build = [f"{h} ({header_status.get(h, '?')})" for h in changed_headers
                        if not (with_headers and (header_status.get(h) == "carried"
                                                           or header_status.get(h, "").startswith("header-reach")))]
        if f.status == CARRIED and p in culprits:
            outcome = "load-failed" if bisect.get("complete") else "load-unknown"
            reason = ("its update does not load or its transition does not finish (bisected)"
                      if outcome == "load-failed"
                      else "the update does not load and the bisection ran out of time before clearing this file")
        elif f.status == CARRIED:
            outcome, reason = "carried", f.reason
        elif f.status == NOT_BUILT:
            outcome, reason = "not-built", f.reason
        elif f.code in ACCEPTED_CODES:
            outcome, reason = "refused-accepted", f.reason
        else:
            outcome, reason = "refused-against", f.reason
        key = outcome if f.status != REFUSED else f"refused:{f.code}"
        counts[key] = counts.get(key, 0) + 1
        row = {"path": p, "outcome": outcome, "code": f.code, "reason": reason, "units": f.units,
               "changed_headers_it_includes": changed_headers, "changed_headers_not_in_build": not_in_build}
        rows.append(row)
        if outcome not in ("carried", "refused-accepted", "not-built"):
            note = (f" [{len(not_in_build)} changed header(s) it includes are not in the build, e.g. "
                    f"{', '.join(not_in_build[:6])}]" if not_in_build else "")
            against.append(f"{p}: {outcome} {f.code}: {first_error(reason)}{note}")
    counted = [r for r in rows if r["outcome"] != "not-built"]
    good = sum(r["outcome"] in ("carried", "refused-accepted") for r in counted)
    lo, hi = wilson(good, len(counted))
    # added/removed .c files the config builds are refused without compiling: known, not sampled
    m = len(population)
    extra = int(summary["c_files"]["added_or_removed_built"])  # type: ignore[index]
    whole = (lo * m / (m + extra), hi * m / (m + extra)) if m + extra else (0.0, 1.0)
    return {
        "release": f"{running}->{to} on {release}",
        "classification": summary,
        "sample": {"size": len(sample), "seed": seed, "population": len(population), "files": rows,
                   "headers_built_with_it": sample_headers, "helper_files": helpers,
                   "headers_results": [f.to_json() for f in build.files if f.path in sample_headers]},
        "sample_counts": counts,
        "counted": len(counted), "for_target": good,
        "fraction": round(good / len(counted), 4) if counted else None,
        "ci95_wilson": [round(lo, 4), round(hi, 4)],
        "ci95_with_added_removed_c": [round(whole[0], 4), round(whole[1], 4)],
        "target": ">= 0.95",
        "against_target": against,
        "update_link_failures": build_attempts,
        "package": str(build.package_path) if build.package_path else None,
        "lab": lab, "bisect": bisect,
        "phases_s": phases,
    }


def first_error(reason: str) -> str:
    """A compiler's failure cut to its first ``error:`` line (the whole text is in --json)."""
    lines = reason.splitlines()
    err = next((ln.strip() for ln in lines if "error:" in ln), "")
    return lines[0] + (f" ... {err}" if err and err != lines[0] else "") if lines else reason


def print_stable(r: dict[str, object]) -> None:
    """The stable measurement for people: counts, the sample's files, the interval, the rest."""
    c = r["classification"]
    assert isinstance(c, dict)
    print(f"{r['release']}")
    for k in ("files_changed", "by_change", "refused_or_skipped_by_path", "c_files", "headers", "other_files"):
        print(f"  {k:<28} {c[k]}")
    if c["c_added_or_removed_built"]:
        print(f"  added/removed .c built:      {c['c_added_or_removed_built']}")
    s = r["sample"]
    assert isinstance(s, dict)
    print(f"sample: {s['size']} of {s['population']} changed .c files the config builds (seed {s['seed']})")
    for row in s["files"]:
        print(f"  {row['outcome']:<17} {row['code']:<20} {row['path']}  {first_error(str(row['reason']))[:200]}")
    print(f"  built with the changed headers the release carries into their units: {s['headers_built_with_it']}")
    print(f"counts: {r['sample_counts']}")
    print(f"carried or refused for an accepted reason: {r['for_target']} of {r['counted']} = {r['fraction']}; "
          f"95 % Wilson interval {r['ci95_wilson']} "
          f"(with the added/removed .c files: {r['ci95_with_added_removed_c']}); target {r['target']}")
    print("against the target:")
    for line in r["against_target"] or ["  (none)"]:  # type: ignore[union-attr]
        print(f"  {line}")
    lab = r["lab"]
    assert isinstance(lab, dict)
    print(f"lab: loaded={lab.get('loaded')} transition_finished={lab.get('transition_finished')} "
          f"reverted={lab.get('reverted')} modules first: {lab.get('modules_loaded_first')}")
    if lab.get("error"):
        print(f"  error: {lab['error']}")
    for attempt in r["update_link_failures"]:  # type: ignore[attr-defined]
        print(f"update did not link with {attempt['files']} files: blamed {attempt['blamed']}")
    if r["bisect"]:
        b = r["bisect"]
        assert isinstance(b, dict)
        print(f"bisect: culprits {b['culprits']} ({len(b['steps'])} builds)")
    print(f"phases (s): {r['phases_s']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", action="store_true", help="forget the --to version's download and tree first")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stable", action="store_true", help="the stable point release 6.1.190-1 -> 6.1.192-1, sampled")
    ap.add_argument("--sample", type=int, default=40, help="changed .c files built (--stable)")
    ap.add_argument("--seed", type=int, default=1, help="the sample's random seed (--stable)")
    ap.add_argument("--max-units", type=int, default=DEFAULT_MAX_UNITS)
    ap.add_argument("--lab-lock", help="take this lock around each lab boot only (--stable)")
    ap.add_argument("--without-headers", action="store_true",
                    help="build the sampled .c files alone, without the headers the release carries into them")
    ap.add_argument("--leave-out", action="append", default=[], metavar="PATH[=WHY]",
                    help="a sampled file an earlier run found stops the update's link: counted against the "
                         "target with WHY, not built again (saves a failing build of the whole sample)")
    ap.add_argument("--bisect-minutes", type=float, default=30, help="time budget for finding what stops a load")
    args = ap.parse_args()
    if args.stable:
        def say(m: str) -> None:
            print(f"{time.strftime('%H:%M:%S')} {m}", file=sys.stderr, flush=True)
        result = stable_release(args.sample, args.seed, args.max_units, args.lab_lock, args.bisect_minutes,
                                not args.without_headers,
                                dict((x.split("=", 1) + [""])[:2] for x in args.leave_out), say)
        if args.json:
            print_results(result, True)
        else:
            print_stable(result)
        return 0
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
