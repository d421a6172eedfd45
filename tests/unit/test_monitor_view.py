"""monitor --show's drawing: rates per interval, side-by-side log2 histograms, no escapes in a pipe."""

from __future__ import annotations

import argparse
import json

from dynamos.cli import commands
from dynamos.cli import monitorview as view
from dynamos.monitor import MonitorRow


def row(edition: int, calls: int, buckets: tuple[int, ...]) -> MonitorRow:
    return MonitorRow("mon", "pipe_write", edition, f"e{edition}", calls, 0, 100.0, 64, 1024, buckets)


def test_two_peaks_show_as_two_groups_of_bars() -> None:
    # Edition 1: half the calls near 64 ns, half near 64 us: p50/p99 alone would hide that.
    buckets = [0] * 40
    buckets[6], buckets[16] = 500, 500
    text = view.histograms([row(0, 10, (0,) * 5 + (10,)), row(1, 1000, tuple(buckets))])
    lines = text.splitlines()
    assert lines[0] == "mon pipe_write" and "0:e0" in lines[1] and "1:e1" in lines[1]
    bars = {line.split()[0]: line for line in lines[2:]}
    assert set(bars) >= {">=32ns", ">=64ns", ">=65.5us"}
    assert bars[">=64ns"].count("#") == bars[">=65.5us"].count("#") == view.BAR
    assert bars[">=1.02us"].count("#") == 0  # the valley between the peaks stays empty


def test_rates_are_per_interval() -> None:
    rows = [row(0, 150, ())]
    assert view.rates(rows, None, 1.0) == ["-"]
    assert view.rates(rows, {("mon", "pipe_write", 0): 50}, 2.0) == ["50/s"]


def test_show_into_a_pipe_has_no_escapes_and_json_streams_one_object_per_interval(monkeypatch, capsys) -> None:
    samples = iter([[row(0, 10, (1,))], [row(0, 30, (3,))]])

    def rows(update=None):
        try:
            return next(samples)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(commands.time, "sleep", lambda _s: None)
    args = argparse.Namespace(update=None, json=False, once=False, interval=1.0)
    try:
        commands._monitor_show(args, rows)
    except KeyboardInterrupt:
        pass
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("dynamos monitor (Ctrl-C to stop)") == 2
    samples = iter([[row(0, 10, (1,))], [row(0, 30, (3,))]])
    args.json = True
    try:
        commands._monitor_show(args, rows)
    except KeyboardInterrupt:
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and [json.loads(line)["functions"][0]["calls"] for line in lines] == [10, 30]
