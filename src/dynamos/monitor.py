"""Monitoring editions (DynAMOS' performance-monitoring injection), with no edits by the user.

``dynamos monitor FUNCTION...`` writes an update source whose functions have no editions of
their own but ``monitor = true``: the generated dispatcher runs the kernel's original code and
counts and times every call. Prototypes come from BTF, so any traceable function will do.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamos.abi import LATENCY_FILE
from dynamos.builder.kbuild import BuildResult, build_update
from dynamos.errors import UpdateSourceError
from dynamos.kernel.editions import FunctionControl, functions_of, normalize_name
from dynamos.kernel.modules import loaded_modules
from dynamos.target import TargetKernel
from dynamos.update.model import MAX_NAME_LEN

_FUNCTION_RE = re.compile(r"^(?:(?P<object>[A-Za-z0-9_-]+):)?(?P<name>[A-Za-z_][A-Za-z0-9_.]*)$")


def monitor_name(functions: list[str]) -> str:
    """Default update name: ``monitor-<first function>`` (+ how many more)."""
    first = functions[0].split(":")[-1].replace("_", "-").replace(".", "-").lower()
    more = f"-and-{len(functions) - 1}" if len(functions) > 1 else ""
    return ("monitor-" + first)[: MAX_NAME_LEN - len(more)] + more


def monitor_update_toml(functions: list[str], name: str) -> str:
    """update.toml of a monitoring update; functions are ``name`` or ``module:name``."""
    if not functions:
        raise UpdateSourceError("monitor: name at least one kernel function")
    lines = ["[update]", f'name = "{name}"',
             f'description = "dynamos monitor: call counts and latency of {", ".join(functions)}"', ""]
    for text in dict.fromkeys(functions):
        m = _FUNCTION_RE.match(text)
        if not m:
            raise UpdateSourceError(f"monitor: {text!r} is not a function name (NAME or MODULE:NAME)")
        lines += ["[[function]]", f'name = "{m["name"]}"', "monitor = true"]
        if m["object"]:
            lines.append(f'object = "{m["object"]}"')
        lines.append("")
    return "\n".join(lines)


def build_monitor(functions: list[str], target: TargetKernel, output: Path, name: str | None = None,
                  progress: Callable[[str], None] | None = None) -> BuildResult:
    """Build the monitoring update package for ``functions`` into ``output``."""
    with tempfile.TemporaryDirectory(prefix="dynamos-monitor-") as tmp:
        source = Path(tmp) / "monitor"
        source.mkdir()
        (source / "update.toml").write_text(monitor_update_toml(functions, name or monitor_name(functions)))
        return build_update(source, target, output=output, progress=progress)


@dataclass
class MonitorRow:
    update: str
    function: str
    edition: int
    name: str
    calls: int
    in_flight: int
    mean_ns: float | None
    p50_ns: int | None
    p99_ns: int | None
    buckets: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"update": self.update, "function": self.function, "edition": self.edition, "name": self.name,
                "calls": self.calls, "in_flight": self.in_flight, "mean_ns": self.mean_ns,
                "p50_ns": self.p50_ns, "p99_ns": self.p99_ns, "log2_ns_buckets": list(self.buckets)}


def monitored(root: Path = Path("/")) -> list[FunctionControl]:
    """Every function of a loaded update that is monitored (has latency counters)."""
    out = []
    for module in loaded_modules(root).values():
        out += [f for f in functions_of(module.name, root) if (f.path / LATENCY_FILE).exists()]
    return out


def monitor_rows(root: Path = Path("/"), update: str | None = None) -> list[MonitorRow]:
    rows = []
    for control in monitored(root):
        if update is not None and control.update != normalize_name(update):
            continue
        latency = {lat.edition: lat for lat in control.latency() or []}
        for state in control.editions():
            lat = latency.get(state.index)
            rows.append(MonitorRow(control.update, control.function, state.index, state.name, state.calls,
                                   state.in_flight, lat.mean_ns if lat else None,
                                   lat.percentile_ns(0.5) if lat else None,
                                   lat.percentile_ns(0.99) if lat else None, lat.buckets if lat else ()))
    return rows
