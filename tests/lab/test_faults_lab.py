"""Faults on the real kernel: kill -9 and Ctrl-C at every registered phase of apply, revert and
switch (``dynamos.kernel.phases.PHASES``), an unwritable action log, and full tmpfs disks under
dynamos' log, state and replay store. One guest program walks them all
(tests/lab/programs/fault_walk.py) and reports; this test checks every (operation, phase,
signal) was covered and nothing failed: status told the truth, recover resolved, no module was
left half-loaded, and an update status called applied served /proc/cmdline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from dynamos.kernel.phases import PHASES

from .conftest import EXAMPLES

pytestmark = pytest.mark.lab

WALK = Path(__file__).resolve().parent / "programs" / "fault_walk.py"

GLOBAL_BANNER = {
    "update.toml": '[update]\nname = "cmdline-global"\ndescription = "A /proc/cmdline banner, switched globally"\n'
                   'consistency = "global"\n\n[[function]]\nname = "cmdline_proc_show"\n'
                   'edition = "cmdline_show_global"\n',
    "cmdline.c": "// SPDX-License-Identifier: GPL-2.0\n#include <linux/seq_file.h>\n\n"
                 "extern char *saved_command_line;\n\n"
                 "int cmdline_show_global(struct seq_file *m, void *v)\n{\n"
                 '\tseq_printf(m, "[global banner] %s\\n", saved_command_line);\n\treturn 0;\n}\n',
}


def test_kill_and_ctrl_c_at_every_phase_and_full_disks(guest, build):
    pkgs = [build(EXAMPLES / "cmdline-banner"), build(GLOBAL_BANNER, "cmdline-global"),
            build(EXAMPLES / "cmdline-editions")]
    t0 = time.monotonic()
    r = guest.run(sys.executable, str(WALK), *map(str, pkgs), timeout=900)
    seconds = time.monotonic() - t0
    report = json.loads(r.stdout)
    print(f"fault walk: {len(report['cases'])} cases in {report.get('phase_walk_seconds')} s, "
          f"all in {report['seconds']} s in the guest "
          f"({seconds:.1f} s of lab time)", file=sys.stderr)
    for c in report["cases"]:
        print(f"  {c['operation']}:{c['phase']}:{c['signal']} {c['update']}: exit {c['exit']}, "
              f"recovered {c['recovered']}, applied after {c['applied_after']} ({c['seconds']} s)", file=sys.stderr)
    for label in ("unwritable_log", "full_disk"):
        for key, message in report.get(label, {}).items():
            print(f"  {label} {key}: {message}", file=sys.stderr)
    assert report["failures"] == [], json.dumps(report["failures"], indent=1)
    assert report["phases"] == {op: list(p) for op, p in PHASES.items()}  # the guest walked this registry
    covered = {(c["operation"], c["phase"], c["signal"]) for c in report["cases"]}
    assert covered == {(op, p, s) for op, ps in PHASES.items() for p in ps for s in ("KILL", "INT")}
    assert set(report["unwritable_log"]) == {"apply", "revert", "switch"}
    assert set(report["full_disk"]) == {"log", "state", "lock", "accepted"}
    assert "No space left" in report["full_disk"]["log"] or "short write" in report["full_disk"]["log"]
