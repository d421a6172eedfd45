"""Run-time control of multi-edition functions: which edition serves which calls.

An update module with multi-edition functions publishes, per function, the control files
documented in ``dynamos/runtime/dynamos_editions.h`` under
``/sys/module/<update>/dynamos/<function>/``. ``dynamos switch``, ``retire``, ``status`` and
``monitor --show`` are this module; everything goes through those files, so a script may
use them directly too.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamos.abi import (
    CONTROL_DIR,
    EDITIONS_FILE,
    GLOBAL_FILE,
    LATENCY_BUCKETS,
    LATENCY_FILE,
    MAX_PIDS,
    MAX_RULES,
    RETIRE_FILE,
    ROUTE_FILE,
    SHARE_SCALE,
    THREAD_FILE,
)
from dynamos.errors import RefusedError, TransitionError
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import ActionLog, default_log_path
from dynamos.kernel.journal import Journal
from dynamos.kernel.modules import normalize_name
from dynamos.kernel.phases import reached
from dynamos.update.names import checked_name


@dataclass(frozen=True)
class EditionState:
    """One edition of a function as the runtime reports it."""

    index: int  # 0 is the kernel's original code
    name: str
    calls: int
    in_flight: int
    live: bool  # False once retired

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "calls": self.calls, "in_flight": self.in_flight,
                "live": self.live}


@dataclass(frozen=True)
class Latency:
    """Call latencies of one edition: total time and a log2 histogram (bucket b: [2^b, 2^(b+1)) ns)."""

    edition: int
    total_ns: int
    buckets: tuple[int, ...]

    @property
    def calls(self) -> int:
        return sum(self.buckets)

    @property
    def mean_ns(self) -> float | None:
        return self.total_ns / self.calls if self.calls else None

    def percentile_ns(self, fraction: float) -> int | None:
        """Upper bound of the bucket holding that fraction of the calls (a histogram's resolution)."""
        if not self.calls:
            return None
        wanted, seen = fraction * self.calls, 0
        for bucket, count in enumerate(self.buckets):
            seen += count
            if seen >= wanted:
                return 2 ** (bucket + 1)
        return 2 ** len(self.buckets)

    def to_json(self) -> dict[str, Any]:
        return {"edition": self.edition, "calls": self.calls, "total_ns": self.total_ns,
                "mean_ns": self.mean_ns, "p50_ns": self.percentile_ns(0.5), "p99_ns": self.percentile_ns(0.99),
                "log2_ns_buckets": list(self.buckets)}


def parse_editions(text: str) -> list[EditionState]:
    out = []
    for line in text.splitlines():
        index, name, calls, in_flight, state = line.split()
        out.append(EditionState(int(index), name, int(calls), int(in_flight), state == "live"))
    return out


def parse_key_values(text: str) -> dict[str, str]:
    """A runtime control file of ``key value`` lines (``global``, ``thread``) as a dict."""
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def parse_latency(text: str) -> list[Latency]:
    """The ``latency`` control file: per edition its index, total ns and the log2 buckets."""
    out = []
    for line in text.splitlines():
        numbers = [int(word) for word in line.split()]
        if len(numbers) != 2 + LATENCY_BUCKETS:
            raise ValueError(f"a latency line has {len(numbers) - 2} buckets, the runtime writes {LATENCY_BUCKETS}")
        out.append(Latency(numbers[0], numbers[1], tuple(numbers[2:])))
    return out


@dataclass
class FunctionControl:
    """The control directory of one multi-edition function of a loaded update."""

    update: str  # livepatch (module) name
    function: str  # directory name: "name", "name,sympos", "module:name"
    path: Path

    def editions(self) -> list[EditionState]:
        return parse_editions(self._read(EDITIONS_FILE))

    def route(self) -> list[str]:
        return [line for line in self._read(ROUTE_FILE).splitlines() if line]

    def latency(self) -> list[Latency] | None:
        """Latency per edition, or None when the update does not monitor this function."""
        if not (self.path / LATENCY_FILE).exists():
            return None
        return parse_latency(self._read(LATENCY_FILE))

    def thread(self) -> dict[str, Any] | None:
        """For a kernel thread's main function: which side its thread runs ("new" or
        "original"), the thread's pid, restarts, last restart's ns and error; else None."""
        if not (self.path / THREAD_FILE).exists():
            return None
        return {k: v if k == "on" else int(v) for k, v in parse_key_values(self._read(THREAD_FILE)).items()}

    def edition_index(self, edition: str | int) -> int:
        """An edition by number or by name (of the C function, or the kernel function for 0)."""
        text = checked_name(str(edition), "edition", "the caller")
        states = self.editions()
        for state in states:
            if text == str(state.index) or text == state.name:
                return state.index
        names = ", ".join(f"{s.index}={s.name}" for s in states)
        raise RefusedError(f"{self.update}: {self.function} has no edition {text!r} (editions: {names})")

    def command(self, line: str) -> None:
        """Write one route command; the runtime swaps the route atomically for new calls."""
        if (self.path.parent / GLOBAL_FILE).exists():
            raise RefusedError(f"{self.update} has global consistency: its functions change editions "
                               "together, at apply and revert, not one by one")
        try:
            with open(self.path / ROUTE_FILE, "w") as f:
                f.write(line)
        except OSError as e:
            reason = {errno.ERANGE: "a number is out of range", errno.ENOSPC: f"too many rules ({MAX_RULES} at most)",
                      errno.E2BIG: f"too many pids ({MAX_PIDS} at most)", errno.EINVAL: "the runtime did not accept it",
                      errno.EACCES: "permission denied (run as root)", errno.EPERM: "permission denied"}
            raise RefusedError(f"{self.update}: route command {line!r} for {self.function} refused: "
                               f"{reason.get(e.errno, os.strerror(e.errno or 0))}") from e

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"function": self.function, "route": self.route(),
                                "editions": [e.to_json() for e in self.editions()]}
        latency = self.latency()
        if latency is not None:
            data["latency"] = [lat.to_json() for lat in latency]
        thread = self.thread()
        if thread is not None:
            data["thread"] = thread
        return data

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError as e:
            raise RefusedError(f"cannot read {self.path / name}: {e.strerror}") from e


def control_root(update: str, root: Path = Path("/")) -> Path:
    return root / "sys" / "module" / normalize_name(update) / CONTROL_DIR


def global_switch_state(update: str, root: Path = Path("/")) -> dict[str, str] | None:
    """The ``global`` control file of an update with global consistency (None for others):
    ``state``, ``switches``, ``attempts``, ``longest_stop_ns``, ``last_busy``, ..."""
    try:
        text = (control_root(update, root) / GLOBAL_FILE).read_text()
    except OSError:
        return None
    return parse_key_values(text)


def functions_of(update: str, root: Path = Path("/")) -> list[FunctionControl]:
    """Multi-edition functions of a loaded update; [] if it has none (or is not loaded)."""
    base = control_root(update, root)
    if not base.is_dir():
        return []
    return [FunctionControl(normalize_name(update), d.name, d) for d in sorted(base.iterdir()) if d.is_dir()]


def function_control(update: str, function: str, root: Path = Path("/")) -> FunctionControl:
    """One function's controls, with an error that says what exists instead."""
    name = normalize_name(update)
    checked_name(function, "function name", "the caller")
    if not (root / "sys" / "module" / name).is_dir():
        raise RefusedError(f"no update named {name} is loaded")
    functions = functions_of(update, root)
    if not functions:
        raise RefusedError(f"update {name} has no multi-edition functions (its update.toml names no editions)")
    for f in functions:
        if f.function == function:
            return f
    matches = [f for f in functions if f.function.split(",")[0].split(":")[-1] == function]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f.function for f in functions)
    why = "is ambiguous" if matches else "is not a multi-edition function of it"
    raise RefusedError(f"{function} {why} in update {name} (its functions: {known})")


@dataclass(frozen=True)
class Selector:
    """Which calls a switch applies to; all None means every call (the default edition)."""

    pids: tuple[int, ...] | None = None
    cgroup: str | None = None
    cpus: str | None = None
    share: float | None = None  # percent of calls

    def __post_init__(self) -> None:
        """Refuse a malformed selector when it is made, before any control file is looked at: the
        runtime takes route commands as text lines, so a CPU list with a newline would be two."""
        if self.pids is not None and (not self.pids or len(self.pids) > MAX_PIDS
                                      or any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 1 << 22
                                             for p in self.pids)):
            raise RefusedError(f"--pids needs 1 to {MAX_PIDS} positive process ids, got {list(self.pids)}")
        if self.cpus is not None and not _CPU_LIST_RE.match(self.cpus):
            raise RefusedError(f"--cpus {self.cpus!r} is not a CPU list (like 0-1,3)")
        if self.share is not None and (isinstance(self.share, bool) or not isinstance(self.share, int | float)
                                       or not 0 <= self.share <= 100):
            raise RefusedError(f"--share is a percentage of calls from 0 to 100, got {self.share}")

    def command(self, edition: int) -> str:
        given = [k for k in ("pids", "cgroup", "cpus", "share") if getattr(self, k) is not None]
        if len(given) > 1:
            raise RefusedError(f"give one selector per switch, not {' and '.join('--' + g for g in given)}")
        if self.pids is not None:
            return f"pids {edition} {','.join(map(str, self.pids))}"
        if self.cgroup is not None:
            cgroup_id, level = cgroup_identity(self.cgroup)
            return f"cgroup {edition} {cgroup_id} {level}"
        if self.cpus is not None:
            return f"cpus {edition} {self.cpus}"
        if self.share is not None:
            return f"share {edition} {round(self.share * SHARE_SCALE / 100)}"
        return f"default {edition}"


_CPU_LIST_RE = re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*$")


def parse_pids(text: str) -> tuple[int, ...]:
    """``--pids`` as given ("812,813"): positive process ids, or a refusal naming the bad one."""
    pids = []
    for word in text.split(","):
        if not word.strip().isdigit() or not word.strip().isascii():
            raise RefusedError(f"--pids {text!r}: {word!r} is not a process id (give numbers like 812,813)")
        pids.append(int(word))
    return Selector(pids=tuple(pids)).pids or ()


def parse_cpus(text: str) -> str:
    """``--cpus`` as given ("0-1,3"), checked to be a CPU list."""
    return Selector(cpus=text).cpus or ""


def parse_share(text: str) -> float:
    """``--share`` as given: a percentage from 0 to 100."""
    try:
        share = float(text)
    except ValueError:
        raise RefusedError(f"--share {text!r} is not a number (a percentage from 0 to 100)") from None
    return Selector(share=share).share or 0.0


def _cgroup2_mount(root: Path = Path("/")) -> Path:
    for line in (root / "proc" / "self" / "mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1].replace("\\040", " "))
    raise RefusedError("no cgroup v2 hierarchy is mounted: a cgroup policy needs one")


def cgroup_identity(path: str, root: Path = Path("/")) -> tuple[int, int]:
    """(id, depth) of a cgroup v2 directory: its inode number is the kernel's cgroup id."""
    mount = _cgroup2_mount(root)
    full = Path(path) if os.path.isabs(path) else mount / path
    full = Path(os.path.realpath(full))
    try:
        relative = full.relative_to(mount)
    except ValueError:
        raise RefusedError(f"{path} is not inside the cgroup v2 hierarchy at {mount}") from None
    if not (full / "cgroup.procs").is_file():
        raise RefusedError(f"{full} is not a cgroup (no cgroup.procs)")
    return os.stat(full).st_ino, len(relative.parts)


def switch(update: str, function: str, edition: str | int | None, selector: Selector = Selector(),
           reset: bool = False, root: Path = Path("/"), wait: float | None = None) -> FunctionControl:
    """Route calls of a multi-edition function: takes effect for calls that start afterwards.
    Under the operation lock (``wait``: see ``journal``), with intent and result in the action log."""
    journal = Journal(root, ActionLog(default_log_path(root)), wait)
    with journal.operation("switch", normalize_name(update), {"function": function, "edition": edition,
                                                             "selector": repr(selector), "reset": reset},
                           lambda phase: reached("switch", phase)):
        control = _switch(update, function, edition, selector, reset, root)
        reached("switch", "routed")
        return control


def _switch(update: str, function: str, edition: str | int | None, selector: Selector, reset: bool,
            root: Path) -> FunctionControl:
    control = function_control(update, function, root)
    if reset:
        if edition is not None or selector != Selector():
            raise RefusedError("--reset takes no edition and no selector: it restores the route the update "
                               "was loaded with")
        control.command("reset")
        return control
    if edition is None:
        raise RefusedError("name the edition to switch to (a number, or a name from 'dynamos status')")
    control.command(selector.command(control.edition_index(edition)))
    return control


@dataclass
class RetireResult:
    update: str
    function: str
    edition: int
    name: str
    drained: bool
    in_flight: int
    seconds: float
    holders: list[dict[str, Any]] = field(default_factory=list)  # tasks with the edition on their stack

    def to_json(self) -> dict[str, Any]:
        return {"update": self.update, "function": self.function, "edition": self.edition, "name": self.name,
                "drained": self.drained, "in_flight": self.in_flight, "seconds": round(self.seconds, 3),
                "holders": self.holders}


def tasks_in(functions: Iterable[str], root: Path = Path("/")) -> list[dict[str, Any]]:
    """Tasks whose kernel stack shows one of ``functions`` (to say who holds calls in flight),
    with frames as ``name+off/size [module]``."""
    return [{**blocker.to_json(), "stack": [frame.split(" ", 1)[-1] for frame in blocker.stack]}
            for blocker, _ in lp.tasks_in_functions(root, set(functions))]


def retire(update: str, function: str, edition: str | int, timeout: float = 10.0,
           progress: Callable[[str], None] | None = None, root: Path = Path("/"),
           wait: float | None = None) -> RetireResult:
    """Take an edition out of service and wait until no call is left in it.

    New calls stop reaching it at once (a call routed to it runs the default edition, or the
    original when the default is retired). On timeout the edition stays retired and the
    TransitionError's result names the tasks still inside it.
    """
    journal = Journal(root, ActionLog(default_log_path(root)), wait)
    with journal.operation("retire", normalize_name(update), {"function": function, "edition": edition}):
        return _retire(update, function, edition, timeout, progress, root)


def _retire(update: str, function: str, edition: str | int, timeout: float,
            progress: Callable[[str], None] | None, root: Path) -> RetireResult:
    control = function_control(update, function, root)
    index = control.edition_index(edition)
    if index == 0:
        raise RefusedError("edition 0 is the kernel's own code: it always stays selectable")
    try:
        (control.path / RETIRE_FILE).write_text(str(index))
    except OSError as e:
        raise RefusedError(f"{update}: cannot retire edition {index} of {function}: {e.strerror}") from e
    started = time.monotonic()
    deadline = started + timeout
    last_said = 0.0
    while True:
        state = control.editions()[index]
        waited = time.monotonic() - started
        if state.in_flight <= 0:
            return RetireResult(control.update, control.function, index, state.name, True, 0, waited)
        if time.monotonic() >= deadline:
            result = RetireResult(control.update, control.function, index, state.name, False, state.in_flight,
                                  waited, tasks_in([state.name], root))
            who = "; ".join(f"{h['comm']} (pid {h['pid']})" for h in result.holders) or "no task shows it"
            raise RetireTimeout(f"{control.update}: edition {index} ({state.name}) of {control.function} is "
                                f"retired but {state.in_flight} call(s) still run in it after {timeout:g} s: "
                                f"{who}", result)
        if progress and waited - last_said >= 1.0:
            progress(f"edition {index} retired; waiting for {state.in_flight} call(s) in flight "
                     f"({waited:.1f} s of {timeout:g} s)")
            last_said = waited
        time.sleep(0.05)


class RetireTimeout(TransitionError):
    """Calls were still running in a retired edition when the wait ended."""

    def __init__(self, message: str, result: RetireResult):
        super().__init__(message)
        self.result = result

    def details(self) -> dict:
        return self.result.to_json()
