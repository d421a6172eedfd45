"""Where the two-vCPU stalls come from: the same guest work under QEMU's multi-threaded TCG (a
host thread per vCPU) and single-threaded TCG (both vCPUs taking turns on one host thread).

The work is what stalled before: the dynamos_pair test module's writer and reader threads call
their functions every 100-200 us while pair-format (global consistency, with a stop_machine
switch) and its per-task variant are applied and reverted ``--rounds`` times. Counted per mode:
operations that failed, kernel trouble lines (soft lockup, RCU stall, hung task, WARN), mixed
reads (must stay 0 under global consistency), and the median time of an apply and a revert.
The guest kernel, module, updates and host are the same in both modes; only how QEMU runs the
two vCPUs differs, so a difference in stalls is QEMU's.

Usage: python bench/bench_two_vcpu_stalls.py [--rounds N] [--modes multi,single] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import print_results  # noqa: E402

from dynamos.builder.kbuild import build_update  # noqa: E402
from dynamos.demo import guest_env  # noqa: E402
from dynamos.errors import LabError  # noqa: E402
from dynamos.lab import Lab, LabConfig  # noqa: E402
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target  # noqa: E402
from tests.lab.conftest import LAB_UPDATES, build_test_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS = "/sys/module/dynamos_pair/parameters"


def run_mode(mode: str, rounds: int, module: str, packages: dict[str, Path], work: Path) -> dict:
    config = LabConfig(kernel=DEFAULT_LAB_KERNEL, cpus=2, tcg_threads=mode, accel="tcg",
                       shares=[str(REPO), str(cache_root()), str(work)])
    lab = Lab.boot(config, progress=lambda m: print(f"[{mode}] {m}", file=sys.stderr))
    out: dict = {"apply_s": [], "revert_s": [], "failed": [], "trouble": [], "hung": None}

    def run(*argv: str, timeout: float = 180):
        r = lab.run(list(argv), env=guest_env(), timeout=timeout)
        out["trouble"] += r.kernel_messages
        return r

    try:
        run(sys.executable, "-c", "import sys; from dynamos.kernel import LibcSyscalls; "
            "LibcSyscalls().init_module(open(sys.argv[1], 'rb').read())", module)
        for i in range(rounds):
            for name, pkg in packages.items():
                for verb, arg, times in (("apply", str(pkg), out["apply_s"]), ("revert", name, out["revert_s"])):
                    t = time.monotonic()
                    r = run(sys.executable, "-m", "dynamos", verb, arg, "--timeout", "60")
                    times.append(time.monotonic() - t)
                    if r.status != 0:
                        out["failed"].append(f"round {i} {verb} {name}: {r.stderr.decode()[-300:]}")
                        run("sh", "-c", f"{sys.executable} -m dynamos revert {name} || true")
        reads, mixed = run("sh", "-c", f"cat {PARAMS}/reads {PARAMS}/mixed").stdout.split()
        out["reads"], out["mixed"] = int(reads), int(mixed)
    except LabError as e:  # the guest stopped answering: that is the finding, with its console
        console = lab.console_text()
        out["hung"] = str(e).splitlines()[0]
        out["console_tail"] = [line for line in console.splitlines()
                               if any(w in line for w in ("lockup", "stall", "RIP:", "hung", "blocked"))][:40]
        kept = cache_root() / "labs" / f"stall-console-{mode}.log"
        kept.write_text(console)
        out["console_log"] = str(kept)
    finally:
        lab.kill()
        lab.discard()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--modes", default="multi,single")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        module, btf_dir = build_test_module(target, work, "dynamos_pair")
        per_task = work / "pair-pertask"
        shutil.copytree(LAB_UPDATES / "pair-format", per_task)
        toml = (per_task / "update.toml").read_text().replace('name = "pair-format"', 'name = "pair-pertask"')
        (per_task / "update.toml").write_text(toml.replace('consistency = "global"\ntransfer = "pair_convert"\n', ""))
        packages = {name: build_update(src, target, output=work, module_dirs=(btf_dir,)).package_path
                    for name, src in (("pair-format", LAB_UPDATES / "pair-format"), ("pair-pertask", per_task))}
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args.rounds, module, packages, work)
    summary = {}
    for mode, r in results.items():
        summary.update({
            f"{mode}.operations": len(r["apply_s"]) + len(r["revert_s"]),
            f"{mode}.failed": len(r["failed"]),
            f"{mode}.hung": r["hung"] or "no",
            f"{mode}.kernel_trouble": len(r["trouble"]),
            f"{mode}.mixed_reads": r.get("mixed"),
            f"{mode}.reads": r.get("reads"),
            f"{mode}.apply_median_s": round(statistics.median(r["apply_s"]), 2) if r["apply_s"] else None,
            f"{mode}.revert_median_s": round(statistics.median(r["revert_s"]), 2) if r["revert_s"] else None,
        })
    if args.json:
        print(json.dumps({"summary": summary, "details": {m: {"failed": r["failed"], "trouble": r["trouble"][:20]}
                                                           for m, r in results.items()}}, indent=2))
    else:
        print_results(summary, False)
        for mode, r in results.items():
            for line in r["failed"][:5] + r["trouble"][:10] + r.get("console_tail", [])[:20]:
                print(f"{mode}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
