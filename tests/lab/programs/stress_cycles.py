"""Apply/revert cycles under load, run inside a lab guest (the host's Python, dynamos importable).

Usage: stress_cycles.py CYCLES PER_TASK_PKG GLOBAL_PKG EDITIONS_PKG SHADOW_PKG

Each cycle is one of four kinds, in turn: a per-task update (cmdline-banner), a global-consistency
update (pipe-read-global), a multi-edition update switched several ways (cmdline-editions), and a
shadow-data update (pipe-bytes). All the while, load runs on every CPU: a CPU burner, and a
process in a loop of the syscalls the updates patch (pipe writes and reads, /proc/cmdline).
After each cycle: no oops/WARN/BUG/RCU stall/soft lockup/hung task in the kernel log, no
livepatch or dynamos module left, and for the shadow kind every shadow variable freed on revert.
Prints one JSON report on stdout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from dynamos import kernel
from dynamos.kernel.editions import Selector, switch

TROUBLE = re.compile(r"Oops|WARNING:|BUG:|rcu_.*(stall|detected)|soft lockup|hung_task|blocked for more than|"
                     r"Call Trace")
SYSCALL_LOAD = """
import os
r, w = os.pipe()
while True:
    os.write(w, b"x" * 64)
    os.read(r, 64)
    with open("/proc/cmdline") as f:
        f.read()
"""


def kmsg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


def leftovers() -> list[str]:
    patches = os.listdir("/sys/kernel/livepatch")
    with open("/proc/modules") as f:
        modules = [line.split()[0] for line in f]
    wanted = ("cmdline_banner", "pipe_read_global", "cmdline_editions", "pipe_bytes")
    return sorted(set(patches) | {m for m in modules if m in wanted})


def pipe_bytes_live() -> int:
    with open("/proc/dynamos_pipe_bytes") as f:
        return int(f.readline().split()[1])


def main() -> int:
    cycles = int(sys.argv[1])
    per_task, global_pkg, editions_pkg, shadow_pkg = sys.argv[2:6]
    cpus = os.cpu_count() or 1
    load = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(cpus)]
    syscalls = subprocess.Popen([sys.executable, "-c", SYSCALL_LOAD])
    seen = len(kmsg())
    report: dict = {"cycles": 0, "cpus": cpus, "seconds": {}, "failures": []}
    started = time.monotonic()
    try:
        for i in range(cycles):
            kind = ("per-task", "global", "editions", "shadow")[i % 4]
            t = time.monotonic()
            try:
                if kind == "per-task":
                    kernel.apply(per_task, timeout=60)
                    with open("/proc/cmdline") as f:
                        assert "dynamos" in f.read(), "the banner edition does not serve /proc/cmdline"
                    kernel.revert("cmdline-banner", timeout=60)
                elif kind == "global":
                    kernel.apply(global_pkg, timeout=60)
                    kernel.revert("pipe-read-global", timeout=60)
                elif kind == "editions":
                    kernel.apply(editions_pkg, timeout=60)
                    for edition, selector in (("2", Selector()), ("1", Selector(share=50.0)),
                                              ("2", Selector(cpus="0")), (None, None)):
                        if selector is None:
                            switch("cmdline-editions", "cmdline_proc_show", None, reset=True)
                        else:
                            switch("cmdline-editions", "cmdline_proc_show", edition, selector)
                        with open("/proc/cmdline") as f:
                            f.read()
                    kernel.revert("cmdline-editions", timeout=60)
                else:
                    kernel.apply(shadow_pkg, timeout=60)
                    time.sleep(0.2)  # the syscall load writes pipes: shadows are made
                    os.kill(syscalls.pid, 19)  # SIGSTOP: no task makes a shadow while it is counted
                    live = pipe_bytes_live()
                    mark = len(kmsg())
                    kernel.revert("pipe-bytes", timeout=60)
                    os.kill(syscalls.pid, 18)  # SIGCONT
                    freed = [line for line in kmsg()[mark:] if "pipe-bytes: reverted, freed" in line]
                    assert freed and f"freed {live} " in freed[-1], (live, freed)
                    assert live > 0, "no shadow was ever made"
            except Exception as e:  # noqa: BLE001 - every failure is data for the report
                report["failures"].append({"cycle": i, "kind": kind, "error": f"{type(e).__name__}: {e}"})
            report["seconds"].setdefault(kind, []).append(round(time.monotonic() - t, 3))
            lines = kmsg()
            trouble = [line for line in lines[seen:] if TROUBLE.search(line)]
            seen = len(lines)
            left = leftovers()
            if trouble or left:
                report["failures"].append({"cycle": i, "kind": kind, "kernel": trouble[:20], "left": left})
            report["cycles"] = i + 1
            if left:
                break  # the next cycle could not start clean
    finally:
        for p in (*load, syscalls):
            p.kill()
            p.wait()
    report["total_seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
