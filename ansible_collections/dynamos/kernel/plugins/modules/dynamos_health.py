#!/usr/bin/python
# GPL-2.0-only
"""Mark the kernel log before an apply, and afterwards check that nothing went wrong since the mark."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dynamos_health
short_description: Kernel-log health check around a live update
description:
  - With C(mark), writes a unique line to the kernel log (C(/dev/kmsg)) and returns it as C(marker).
  - With C(since), runs the optional C(command) (e.g. something that calls the patched code), then fails when
    the kernel log after the marker holds an oops, BUG, WARNING, panic, lockup or a livepatch error,
    or when the command exits non-zero.
options:
  mark:
    description: Write a marker and return it.
    type: bool
    default: false
  since:
    description: The marker a previous C(mark) returned.
    type: str
  command:
    description: Shell command that must succeed (run before the log is read).
    type: str
  timeout:
    description: Seconds the command may take.
    type: int
    default: 60
"""

import os
import re
import subprocess
import time
import uuid

from ansible.module_utils.basic import AnsibleModule

TROUBLE = re.compile(
    r"(Oops:|BUG: |Kernel panic|WARNING: CPU: |general protection fault|soft lockup|hard LOCKUP|"
    r"rcu: INFO: rcu_.* detected stalls|Call Trace:|livepatch: .*(fail|error|unable|not allowed)|"
    r"livepatch: .*refus)", re.IGNORECASE)


def read_kmsg() -> list[str]:
    """Every kernel log record still in the ring buffer, as text (no dmesg needed)."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    lines = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten records: carry on with the next
                continue
            if not record:
                break
            lines.append(record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])
    finally:
        os.close(fd)
    return lines


def since_marker(lines: list[str], marker: str) -> list[str] | None:
    """The records after the last marker line; None when the marker is gone from the buffer."""
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return lines[i + 1:]
    return None


def main() -> None:
    module = AnsibleModule(argument_spec={"mark": {"type": "bool", "default": False}, "since": {"type": "str"},
                                          "command": {"type": "str"}, "timeout": {"type": "int", "default": 60}},
                           supports_check_mode=True)
    p = module.params
    if p["mark"]:
        marker = f"dynamos-health: mark {uuid.uuid4().hex}"
        if not module.check_mode:
            with open("/dev/kmsg", "w") as f:
                f.write(marker + "\n")
        module.exit_json(changed=False, marker=marker)
    if not p["since"]:
        module.fail_json(msg="dynamos_health: give mark=true or since=<marker>")
    result: dict = {"changed": False, "marker": p["since"]}
    problems = []
    if p["command"]:
        try:
            r = subprocess.run(["/bin/sh", "-c", p["command"]], capture_output=True, text=True, timeout=p["timeout"])
            result["command"] = {"rc": r.returncode, "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:]}
            if r.returncode != 0:
                problems.append(f"health command exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
        except subprocess.TimeoutExpired:
            problems.append(f"health command did not finish within {p['timeout']} s")
        time.sleep(0.2)  # a splat the command provoked is printed as it returns
    lines = since_marker(read_kmsg(), p["since"])
    if lines is None:
        problems.append("the marker is no longer in the kernel log (overwritten): cannot tell what happened since")
        lines = []
    trouble = [line for line in lines if TROUBLE.search(line)]
    result["kernel_log"] = lines[-200:]
    result["trouble"] = trouble
    if trouble:
        problems.append("kernel log since the apply: " + " | ".join(trouble[:5]))
    if problems:
        module.fail_json(msg="health check failed: " + "; ".join(problems), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
