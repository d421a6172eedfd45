"""How ``dynamos monitor --show`` draws what it reads: a table with per-interval call rates, and
each function's log2 latency histograms, one column per edition, side by side, so a two-peaked
distribution that p50/p99 would hide is plain to see."""

from __future__ import annotations

from collections.abc import Sequence

from dynamos.cli.present import table
from dynamos.monitor import MonitorRow

BAR = 24  # characters of the longest histogram bar


def ns(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}us" if value >= 1000 else f"{value:.0f}ns"


def bucket_label(b: int) -> str:
    """Bucket b holds calls that took [2^b, 2^(b+1)) ns."""
    low = 1 << b
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if low >= scale:
            return f"{low / scale:.3g}{unit}"
    return f"{low}ns"


def rates(rows: Sequence[MonitorRow], before: dict[tuple[str, str, int], int] | None,
          seconds: float) -> list[str]:
    """Calls per second since ``before`` (the previous interval's counts), "-" on the first."""
    out = []
    for r in rows:
        prev = None if before is None else before.get((r.update, r.function, r.edition))
        out.append("-" if prev is None or seconds <= 0 else f"{(r.calls - prev) / seconds:.0f}/s")
    return out


def counts(rows: Sequence[MonitorRow]) -> dict[tuple[str, str, int], int]:
    return {(r.update, r.function, r.edition): r.calls for r in rows}


def monitor_table(rows: Sequence[MonitorRow], call_rates: Sequence[str]) -> str:
    return table([[r.update, r.function, f"{r.edition}:{r.name}", r.calls, rate, r.in_flight, ns(r.mean_ns),
                   ns(r.p50_ns), ns(r.p99_ns)] for r, rate in zip(rows, call_rates, strict=True)],
                 ["UPDATE", "FUNCTION", "EDITION", "CALLS", "RATE", "IN-FLIGHT", "MEAN", "P50<", "P99<"])


def histograms(rows: Sequence[MonitorRow]) -> str:
    """Per function, the buckets any edition used, a bar per edition scaled to its own peak."""
    blocks = []
    functions = dict.fromkeys((r.update, r.function) for r in rows)
    for update, function in functions:
        mine = [r for r in rows if (r.update, r.function) == (update, function) and any(r.buckets)]
        if not mine:
            continue
        used = [b for b in range(max(len(r.buckets) for r in mine)) if any(b < len(r.buckets) and r.buckets[b]
                                                                             for r in mine)]
        header = ["LATENCY"] + [f"{r.edition}:{r.name}" for r in mine]
        lines = []
        for b in range(used[0], used[-1] + 1):
            cells = [f">={bucket_label(b)}"]
            for r in mine:
                n = r.buckets[b] if b < len(r.buckets) else 0
                peak = max(r.buckets)
                cells.append(("#" * max(1, round(BAR * n / peak)) if n else "").ljust(BAR) + f" {n}")
            lines.append(cells)
        blocks.append(f"{update} {function}\n" + table(lines, header))
    return "\n\n".join(blocks)
