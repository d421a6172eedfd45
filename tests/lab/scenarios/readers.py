"""Guest side of the per-caller policies: three processes read /proc/cmdline at the same time
after one route per process was set up (by pid, by cgroup, or by the adaptation handler that
looks at the task name); print which tags each process saw, as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dynamos.kernel.editions import Selector, switch

mode, update = sys.argv[1], sys.argv[2]
READS = 300
groups = [Path("/sys/fs/cgroup/dynamos-r1"), Path("/sys/fs/cgroup/dynamos-r2")]

go_r, go_w = os.pipe()
children = []
for index in range(3):
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        Path("/proc/self/comm").write_text(f"reader-{index + 1 if index < 2 else 'x'}")
        os.read(go_r, 1)  # wait until every route is set
        seen = {}
        for _ in range(READS):
            with open("/proc/cmdline") as f:
                text = f.read()
            tag = text.split("]")[0] + "]" if text.startswith("[") else "original"
            seen[tag] = seen.get(tag, 0) + 1
        os.write(out_w, json.dumps(seen).encode())
        os._exit(0)
    os.close(out_w)
    children.append((pid, out_r))

try:
    if mode == "pids":
        switch(update, "cmdline_proc_show", 1, Selector(pids=(children[0][0],)))
        switch(update, "cmdline_proc_show", 2, Selector(pids=(children[1][0],)))
    elif mode == "cgroup":
        for group, (pid, _) in zip(groups, children[:2], strict=True):
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
        switch(update, "cmdline_proc_show", 1, Selector(cgroup=str(groups[0])))
        switch(update, "cmdline_proc_show", 2, Selector(cgroup="dynamos-r2"))  # relative to the mount
    os.close(go_w)  # release all readers at once
    results = []
    for pid, out_r in children:
        data = b""
        while chunk := os.read(out_r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        results.append(json.loads(data))
finally:
    switch(update, "cmdline_proc_show", None, reset=True)
    for group in groups:
        if group.exists():
            group.rmdir()
json.dump(results, sys.stdout)
