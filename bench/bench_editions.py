"""Per-call cost of the edition dispatcher, on the default lab kernel, in one guest run.

A syscall-heavy microbenchmark (umask in a tight C loop) runs with ``__x64_sys_umask``:
- unpatched (the baseline);
- replaced by a plain livepatch edition (livepatch's redirect, the cost dynamos builds on);
- served by a dynamos dispatcher with 1, 2 and 3 editions (the call goes to edition 1);
- dispatched to edition 0 (the kernel's own code through the thunk), and monitored.
Every edition does what the kernel's umask does. Each variant: median over rounds (all variants
in turn) of medians of several loop runs; ratios are to the unpatched kernel and to the plain livepatch.

Usage: python bench/bench_editions.py [--runs N] [--rounds N] [--calls N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dynamos.builder.kbuild import build_update
from dynamos.demo import guest_env
from dynamos.lab import Lab, LabConfig
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target

FUNCTION = "__x64_sys_umask"

EDITION_C = """\
#include <linux/fs_struct.h>
#include <linux/sched.h>
#include <linux/stat.h>
#include <asm/ptrace.h>
"""
EDITION_FN = """
long {name}(const struct pt_regs *regs)
{{
	return xchg(&current->fs->umask, (int)regs->di & S_IRWXUGO);
}}
"""

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long calls = atol(argv[1]), i;
	struct timespec a, b;

	syscall(SYS_umask, 022);
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (i = 0; i < calls; i++)
		syscall(SYS_umask, 022);
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / calls);
	return 0;
}
"""


def variants() -> dict[str, tuple[str, list[str]]]:
    """Variant name -> (its [[function]] table body, the editions it defines)."""
    def multi(n: int, default: int = 1, monitor: bool = False) -> tuple[str, list[str]]:
        names = [f"umask_e{i}" for i in range(1, n + 1)]
        body = f"editions = {json.dumps(names)}\ndefault = {default}\n" + ("monitor = true\n" if monitor else "")
        return body, names

    return {
        "livepatch": ('edition = "umask_plain"\n', ["umask_plain"]),
        "dispatch-1": multi(1),
        "dispatch-2": multi(2),
        "dispatch-3": multi(3),
        "dispatch-to-original": multi(1, default=0),
        "monitored-1": multi(1, monitor=True),
    }


def build_packages(target, work: Path) -> dict[str, Path]:
    packages = {}
    for variant, (body, editions) in variants().items():
        src = work / variant
        src.mkdir()
        (src / "update.toml").write_text(
            f'[update]\nname = "bench-{variant}"\ndescription = "bench {variant}"\n\n'
            f'[[function]]\nname = "{FUNCTION}"\n{body}')
        (src / "umask.c").write_text(EDITION_C + "".join(EDITION_FN.format(name=n) for n in editions))
        packages[variant] = build_update(src, target, output=work).package_path
    return packages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="loop runs per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per variant (median)")
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    target = fetch_target(DEFAULT_LAB_KERNEL)
    with tempfile.TemporaryDirectory(prefix="dynamos-bench-", dir=cache_root()) as tmp:
        work = Path(tmp)
        packages = build_packages(target, work)
        loop = work / "umask_loop"
        (work / "loop.c").write_text(LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", str(loop), str(work / "loop.c")], check=True)

        lab = Lab.boot(LabConfig(kernel=target.release, shares=[str(work), str(cache_root())]))
        try:
            def guest(*argv: str) -> str:
                r = lab.run(list(argv), timeout=300, env=guest_env())
                assert r.status == 0 and not r.kernel_messages, (argv, r)
                return r.stdout.decode()

            def loop_ns() -> float:
                return statistics.median(float(guest(str(loop), str(args.calls))) for _ in range(args.runs))

            # Rounds over all variants, so slow drifts of the host hit every variant alike.
            samples: dict[str, list[float]] = {"unpatched": [], **{v: [] for v in packages}}
            for _ in range(args.rounds):
                samples["unpatched"].append(loop_ns())
                for variant, package in packages.items():
                    guest(sys.executable, "-m", "dynamos", "apply", str(package))
                    samples[variant].append(loop_ns())
                    guest(sys.executable, "-m", "dynamos", "revert", f"bench-{variant}")
            results = {k: statistics.median(v) for k, v in samples.items()}
        finally:
            lab.kill()
            lab.discard()

    base, plain = results["unpatched"], results["livepatch"]
    rows = {k: {"ns_per_call": round(v, 1), "vs_unpatched": round(v / base, 3), "vs_livepatch": round(v / plain, 3)}
            for k, v in results.items()}
    if args.json:
        json.dump({"function": FUNCTION, "calls": args.calls, "runs": args.runs, "rounds": args.rounds,
                   "results": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(f"umask per call, median of {args.rounds} rounds x {args.runs} runs of {args.calls} calls (lab, TCG):")
    for k, r in rows.items():
        print(f"  {k:22s} {r['ns_per_call']:8.1f} ns   x{r['vs_unpatched']:.3f} unpatched   "
              f"x{r['vs_livepatch']:.3f} livepatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
