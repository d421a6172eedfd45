"""Guest side of the scheduling scenario: two CPU-bound loops in two cgroups share one CPU while
update_curr's editions are switched for one cgroup; report each phase's CPU share as JSON."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from dynamos.kernel.editions import Selector, switch

UPDATE, FUNCTION = "sched-weight", "update_curr"
window = float(sys.argv[1])
root = Path("/sys/fs/cgroup")
groups = [root / "dynamos-a", root / "dynamos-b"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def share_of_a(pids: list[int]) -> float:
    before = [cpu_seconds(p) for p in pids]
    time.sleep(window)
    used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    return used[0] / sum(used)


pids = []
for group in groups:
    group.mkdir(exist_ok=True)
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {0})
        while True:
            pass
    os.sched_setaffinity(pid, {0})
    (group / "cgroup.procs").write_text(str(pid))
    pids.append(pid)
phases = {}
try:
    time.sleep(0.5)
    phases["original"] = share_of_a(pids)
    switch(UPDATE, FUNCTION, 1, Selector(cgroup=str(groups[0])))
    phases["heavy"] = share_of_a(pids)
    switch(UPDATE, FUNCTION, 2, Selector(cgroup=str(groups[0])))
    phases["light"] = share_of_a(pids)
    switch(UPDATE, FUNCTION, None, reset=True)
    phases["reset"] = share_of_a(pids)
finally:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    for group in groups:
        group.rmdir()
json.dump(phases, sys.stdout)
