"""The kernel's livepatch state: ``/sys/kernel/livepatch`` and the tasks' ``patch_state``.

Layout (Linux 6.1)::

    /sys/kernel/livepatch/<patch>/{enabled,transition,force}
    /sys/kernel/livepatch/<patch>/<object>/patched          (object: "vmlinux" or a module)
    /sys/kernel/livepatch/<patch>/<object>/<function,sympos>/
    /proc/<pid>/task/<tid>/patch_state                      (-1 idle, 0 unpatched, 1 patched)

During a transition every task moves to the patch's target state, which is what ``enabled``
shows (reversing a transition flips ``enabled`` and the target with it). Tasks still in the other
state are the ones blocking; their kernel stacks tell why.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.abi import KTHREAD_COPY_PREFIX
from dynamos.kernel.syscalls import Syscalls

LIVEPATCH_DIR = "sys/kernel/livepatch"
PATCH_ATTRIBUTES = frozenset({"enabled", "transition", "force", "replace", "stack_order"})


@dataclass(frozen=True)
class PatchedFunction:
    """A function entry of a livepatch in sysfs."""

    name: str
    object: str
    sympos: int  # as sysfs shows it: 1 when the patch left it 0 (unique)
    patched: bool  # the object is loaded and redirected


@dataclass
class Livepatch:
    """One ``/sys/kernel/livepatch/<patch>`` directory."""

    name: str
    enabled: bool
    transition: bool
    objects: dict[str, bool] = field(default_factory=dict)  # object -> patched
    functions: list[PatchedFunction] = field(default_factory=list)
    replace: bool | None = None  # sysfs shows it only on kernels newer than 6.1

    @property
    def target_state(self) -> int:
        """patch_state a task has once it has moved in the current (or last) transition."""
        return 1 if self.enabled else 0


def livepatch_root(root: Path) -> Path:
    return root / LIVEPATCH_DIR


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_livepatch(root: Path, name: str) -> Livepatch | None:
    """State of livepatch ``name``, or None when it is not (or no longer) registered."""
    d = livepatch_root(root) / name
    enabled = _read_int(d / "enabled")
    if enabled is None:
        return None  # gone, or vanished while being read (freed after a transition)
    patch = Livepatch(name, bool(enabled), bool(_read_int(d / "transition")))
    replace = _read_int(d / "replace")
    if replace is not None:
        patch.replace = bool(replace)
    try:
        entries = sorted(d.iterdir())
    except OSError:
        return patch
    for obj_dir in entries:
        if obj_dir.name in PATCH_ATTRIBUTES or not obj_dir.is_dir():
            continue
        patched = bool(_read_int(obj_dir / "patched"))
        patch.objects[obj_dir.name] = patched
        try:
            func_dirs = sorted(p for p in obj_dir.iterdir() if p.is_dir())
        except OSError:
            continue
        for func_dir in func_dirs:
            fname, _, pos = func_dir.name.rpartition(",")
            if not fname:
                fname, pos = func_dir.name, "1"
            try:
                sympos = int(pos)
            except ValueError:
                sympos = 1
            patch.functions.append(PatchedFunction(fname, obj_dir.name, sympos, patched))
    return patch


def livepatch_names(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in livepatch_root(root).iterdir() if p.is_dir())
    except OSError:
        return []


def read_livepatches(root: Path) -> list[Livepatch]:
    """Every registered livepatch, in name order."""
    patches = (read_livepatch(root, n) for n in livepatch_names(root))
    return [p for p in patches if p is not None]


def write_force(syscalls: Syscalls, root: Path, name: str) -> None:
    """Write ``force``: every task not yet switched is switched without the stack check.

    livepatch then keeps the module forever (it cannot know that no task still runs old code).
    """
    syscalls.write_attribute(os.fspath(livepatch_root(root) / name / "force"), b"1")


def write_enabled(syscalls: Syscalls, root: Path, name: str, value: bool) -> None:
    """Write ``enabled``; writing the opposite of the target reverses a transition in flight.

    The kernel acts on the write synchronously: when it returns, the (reverse) transition is
    under way and ``transition`` reads 1 until it ends.
    """
    syscalls.write_attribute(os.fspath(livepatch_root(root) / name / "enabled"), b"1" if value else b"0")


def explain_enabled_error(err: OSError, name: str, value: bool) -> str:
    code = err.errno or 0
    if code == errno.ENOENT:
        return f"livepatch {name} is no longer registered"
    if code == errno.EBUSY:
        return "another livepatch is in transition: only one transition runs at a time; retry when it ends"
    if code == errno.EINVAL:
        return f"livepatch {name} is already {'enabled' if value else 'disabled'} (or cannot be re-enabled)"
    return os.strerror(code) if code else str(err)


@dataclass(frozen=True)
class Task:
    """A task (thread) as livepatch sees it."""

    pid: int  # thread group id (the process)
    tid: int
    comm: str
    patch_state: int

    def to_json(self) -> dict:
        data: dict = {"pid": self.pid, "comm": self.comm}
        if self.tid != self.pid:
            data["tid"] = self.tid
        return data


@dataclass(frozen=True)
class Blocker:
    """A task holding up a transition, with the kernel stack that explains why."""

    pid: int
    tid: int
    comm: str
    stack: tuple[str, ...]

    @property
    def thread_frame(self) -> str | None:
        """For a kernel thread, the frame of its main function: the one the generic ``kthread`` runs."""
        names = [frame_function(frame) for frame in self.stack]
        at = names.index("kthread") if "kthread" in names else 0
        return self.stack[at - 1] if at > 0 else None

    @property
    def thread_function(self) -> str | None:
        """For a kernel thread, its main function."""
        frame = self.thread_frame
        return frame_function(frame) if frame else None

    def describe(self) -> str:
        who = f"pid {self.pid}" + (f" (tid {self.tid})" if self.tid != self.pid else "")
        lines = [f"{who} {self.comm}"]
        lines += [f"      {frame}" for frame in self.stack] or ["      (stack unavailable)"]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"pid": self.pid, "tid": self.tid, "comm": self.comm, "stack": list(self.stack)}


def frame_function(frame: str) -> str:
    """The function of a ``/proc/<pid>/stack`` frame: ``[<0>] pipe_read+0x1c/0x60`` -> ``pipe_read``."""
    return frame.split(" ", 1)[-1].split("+", 1)[0]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def iter_tasks(root: Path) -> list[Task]:
    """Every task with a readable ``patch_state`` (threads included)."""
    proc = root / "proc"
    tasks = []
    try:
        pids = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        task_root = proc / str(pid) / "task"
        try:
            tids = sorted(int(t.name) for t in task_root.iterdir() if t.name.isdigit())
            dirs = [(tid, task_root / str(tid)) for tid in tids]
        except OSError:
            dirs = [(pid, proc / str(pid))]  # no task/ dir: treat the process as its only task
        for tid, d in dirs:
            state = _read_int(d / "patch_state")
            if state is None:
                continue  # exited meanwhile, or not readable
            comm = (_read_text(d / "comm") or "?").strip()
            tasks.append(Task(pid, tid, comm, state))
    return tasks


def pending_tasks(root: Path, target: int) -> list[Task]:
    """Tasks not yet in ``target`` state (a task shows -1 only when nothing is in transition)."""
    return [t for t in iter_tasks(root) if t.patch_state not in (target, -1)]


def blockers(root: Path, target: int) -> list[Blocker]:
    """Pending tasks with their kernel stacks (``/proc/<pid>/task/<tid>/stack``)."""
    found = []
    for t in pending_tasks(root, target):
        base = root / "proc" / str(t.pid)
        text = _read_text(base / "task" / str(t.tid) / "stack")
        if text is None:
            text = _read_text(base / "stack")
        stack = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
        found.append(Blocker(t.pid, t.tid, t.comm, stack))
    return found




def task_stacks(root: Path) -> list[Blocker]:
    """Every task with its kernel stack now (``/proc/<pid>/task/<tid>/stack``), in pid order."""
    found = []
    for pid_dir in (root / "proc").glob("[0-9]*"):
        for task_dir in pid_dir.glob("task/[0-9]*"):
            text = _read_text(task_dir / "stack")
            if not text:
                continue
            stack = tuple(line.strip() for line in text.splitlines() if line.strip())
            comm = (_read_text(task_dir / "comm") or "?").strip()
            found.append(Blocker(int(pid_dir.name), int(task_dir.name), comm, stack))
    return sorted(found, key=lambda b: (b.pid, b.tid))


def threads_on_update_code(stacks: Iterable[Blocker]) -> list[tuple[Blocker, str, str]]:
    """Kernel threads an update restarted onto its own code: (thread, the copy they run, the
    update module it is in)."""
    found = []
    for task in stacks:
        frame = task.thread_frame
        if frame and frame_function(frame).startswith(KTHREAD_COPY_PREFIX) and frame.endswith("]") and "[" in frame:
            found.append((task, frame_function(frame), frame.rsplit("[", 1)[1][:-1]))
    return found


def tasks_in_functions(root: Path, functions: set[str],
                       stacks: Iterable[Blocker] | None = None) -> list[tuple[Blocker, list[str]]]:
    """Tasks whose kernel stack now shows one of ``functions``, each with the names it shows
    (from ``stacks`` when the caller has read them already).

    Before an update loads, these are the tasks its transition will have to wait for: livepatch
    switches a task only when no function being replaced is on its stack.
    """
    found = []
    for task in task_stacks(root) if stacks is None else stacks:
        hits = sorted({n for n in map(frame_function, task.stack) if n in functions})
        if hits:
            found.append((task, hits))
    return found
