"""A three-lab rollout with ansible-playbook (examples/fleet/rollout.yml: canary, then a wave of
two) against the bare ``dynamos apply`` it wraps, in the same invocation.

Three labs of one vCPU and 512 MiB each are booted once. Each run: the playbook rolls the
fleet-good test update out (timed end to end), then it is reverted everywhere; and on each lab a
bare ``python -m dynamos apply`` of the same package already in the guest (timed), then revert.
Per-host overhead = (rollout - 3 x bare apply) / 3: what the playbook costs per host beyond the
apply itself (module transfer, marks, health check, status queries, Ansible's own work).
Medians of ``--runs``.

Usage: python bench/bench_fleet.py [--runs N] [--json]   (boots labs: run under the lab lock)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import print_results  # noqa: E402

from dynamos.builder.kbuild import build_update  # noqa: E402
from dynamos.lab import Lab, LabConfig  # noqa: E402
from dynamos.lab.session import lab_state_dir  # noqa: E402
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLEET = REPO / "examples" / "fleet"
DYNAMOS = [sys.executable, "-m", "dynamos"]


def inventory(names: list[str], package: Path) -> dict:
    common = {"ansible_connection": "dynamos.kernel.lab", "ansible_python_interpreter": "/usr/bin/python3",
              "ansible_remote_tmp": "/tmp/.ansible/tmp", "dynamos_executable": " ".join(DYNAMOS),
              "dynamos_packages": [str(package)]}
    return {"all": {"vars": common, "children": {"canary": {"hosts": {names[0]: {}}},
                                                 "waves": {"hosts": {n: {} for n in names[1:]}}}}}


def revert_all(lab: Lab) -> None:
    live = lab.run(["sh", "-c", "ls /sys/kernel/livepatch"], cwd="/").stdout.decode().split()
    for name in reversed(live):
        lab.run([*DYNAMOS, "revert", name], cwd="/", timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    target = fetch_target(DEFAULT_LAB_KERNEL)
    names = [f"bench-fleet{i}-{os.getpid()}" for i in (1, 2, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        package = build_update(REPO / "tests" / "lab" / "fleet" / "updates" / "fleet-good", target,
                               output=Path(tmp)).package_path
        inv = Path(tmp) / "inventory.yml"
        inv.write_text(json.dumps(inventory(names, package)))
        config = LabConfig(kernel=target.release, cpus=1, memory_mb=512, shares=[str(REPO), str(cache_root())])
        with ThreadPoolExecutor(3) as pool:
            labs = list(pool.map(lambda n: Lab.boot(config, state_dir=lab_state_dir(n)), names))
        env = {**os.environ, "ANSIBLE_CONFIG": str(FLEET / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(REPO),
               "ANSIBLE_LOCAL_TEMP": str(Path(tmp) / "ansible-local")}
        rollout, bare = [], []
        try:
            for lab in labs:
                lab.run(["/bin/sh", "-c", "cat > /tmp/bench.dynpkg"], cwd="/", stdin=package.read_bytes())
            for _ in range(args.runs):
                t = time.monotonic()
                r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv),
                                    str(FLEET / "rollout.yml")], capture_output=True, text=True, env=env)
                rollout.append(time.monotonic() - t)
                if r.returncode != 0:
                    print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
                    return 1
                for lab in labs:
                    revert_all(lab)
                for lab in labs:
                    t = time.monotonic()
                    a = lab.run([*DYNAMOS, "apply", "/tmp/bench.dynpkg"], cwd="/", timeout=120)
                    bare.append(time.monotonic() - t)
                    if a.status != 0:
                        print(a.stderr.decode(), file=sys.stderr)
                        return 1
                    revert_all(lab)
        finally:
            for lab in labs:
                lab.kill()
                lab.discard()
    med_rollout, med_bare = statistics.median(rollout), statistics.median(bare)
    print_results({"runs": args.runs, "rollout_3_labs_s": round(med_rollout, 2),
                   "bare_apply_per_host_s": round(med_bare, 2),
                   "overhead_per_host_s": round((med_rollout - 3 * med_bare) / 3, 2)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
