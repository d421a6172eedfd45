"""Stress on two vCPUs: apply/revert cycles mixing per-task, global, multi-edition and shadow-data
updates, under CPU and syscall load on every CPU (the loop runs inside the guest:
tests/lab/programs/stress_cycles.py). ``bench/bench_stress.py`` runs the same program for 100."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.lab.conftest import EXAMPLES, LAB_UPDATES

pytestmark = pytest.mark.lab

PROGRAM = Path(__file__).parent / "programs" / "stress_cycles.py"
CI_CYCLES = 20


def test_twenty_mixed_cycles_under_load_on_two_vcpus(guest, build):
    assert int(guest.sh("nproc")) >= 2  # the point: calls on one CPU while another switches
    pkgs = [build(EXAMPLES / "cmdline-banner"), build(LAB_UPDATES / "pipe-read-global"),
            build(EXAMPLES / "cmdline-editions"), build(EXAMPLES / "pipe-bytes")]
    r = guest.run(sys.executable, str(PROGRAM), str(CI_CYCLES), *map(str, pkgs), timeout=900)
    report = json.loads(r.stdout)
    print(f"stress: {report['cycles']} cycles on {report['cpus']} vCPUs in {report['total_seconds']} s",
          file=sys.stderr)
    assert report["failures"] == [], report["failures"]
    assert report["cycles"] == CI_CYCLES
    assert {k: len(v) for k, v in report["seconds"].items()} == {
        "per-task": 5, "global": 5, "editions": 5, "shadow": 5}
