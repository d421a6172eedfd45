"""The stable-release bench's pure parts: the interval it reports and how it cuts a compiler's failure."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))  # the bench imports its sibling _report
    try:
        yield importlib.import_module("bench_real_fixes")
    finally:
        sys.path.remove(str(BENCH))


def test_wilson_interval_known_values(bench) -> None:  # type: ignore[no-untyped-def]
    lo, hi = bench.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = bench.wilson(10, 10)  # all successes: the interval still says a sample of 10 is small
    assert hi == 1.0 and round(lo, 4) == 0.7225
    lo, hi = bench.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert bench.wilson(0, 0) == (0.0, 1.0)


def test_first_error_keeps_the_first_line_and_the_first_compiler_error(bench) -> None:  # type: ignore[no-untyped-def]
    reason = ("a.c:3: compiling the patched a.c failed:\nIn file included from b.h:1,\n"
              "a.c:3:5: error: 'struct s' has no member named 'x'\na.c:9:1: error: later")
    assert bench.first_error(reason) == ("a.c:3: compiling the patched a.c failed: ... "
                                         "a.c:3:5: error: 'struct s' has no member named 'x'")
    assert bench.first_error("data changed") == "data changed"
