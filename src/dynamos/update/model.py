"""The update model: what an update source says, once validated.

An update source is a directory with ``update.toml`` and the C files holding new editions of
kernel functions; these frozen classes are what every later layer (C generation, Kbuild, the
package) reads. Only :mod:`dynamos.update.validate` makes them from author input, so the
layers after it can trust them.

Schema (``update.toml``)::

    [update]
    name = "cmdline-banner"     # required; livepatch (module) name with '-' -> '_'
    description = "..."         # required
    kernel = "6.1.0-56-amd64"   # optional: release the update is written for
    replace = true              # optional: atomic replace of earlier updates
    consistency = "global"      # optional: "per-task" (livepatch's, default) or "global"
    transfer = "convert_state"  # optional, global: void convert_state(bool to_new), all CPUs stopped
    version = "1.2"             # optional: the update's own version, shown by status and info
    cves = ["CVE-2024-1086"]    # optional: what it fixes, shown by status and info

    [[function]]                # one or more
    name = "cmdline_proc_show"  # required: kernel function to replace
    edition = "cmdline_proc_show_v2"  # required: non-static C function in a *.c file
    object = "vmlinux"          # optional: "vmlinux" or a module name
    sympos = 1                  # optional: position among same-named symbols

    [[function]]                # several editions live at once, switched at run time
    name = "pipe_write"
    editions = ["pipe_write_v2", "pipe_write_v3"]  # editions 1, 2...; 0 is the kernel's original
    default = 1                 # optional: edition serving calls at load (1; 0 with no editions)
    policy = "pick_pipe_write"  # optional: adaptation handler, a C function returning the edition
    monitor = true              # optional: count calls and time them per edition

    [[kthread]]                 # a kernel thread whose main function (a [[function]]) never returns
    function = "kswapd"         # required: the [[function]] replacing the thread's main function
    object = "vmlinux"          # optional: to tell same-named [[function]]s apart
    stop = "stop_kswapds"       # required: int stop(void), stops the thread(s) at a safe point
    start = "start_kswapds"     # required: int start(int (*threadfn)(void *)), starts them on threadfn
    transfer = "carry_state"    # optional: int transfer(bool to_new), carries their state across
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamos.abi import VMLINUX, generated_name

UPDATE_TOML = "update.toml"
CONSISTENCY_MODELS = ("per-task", "global")
# MODULE_NAME_LEN is 64 - sizeof(unsigned long) = 56 bytes including the NUL: 55 characters.
MAX_NAME_LEN = 55


@dataclass(frozen=True)
class FunctionSpec:
    """One kernel function replaced by an edition written in the update source."""

    name: str  # function in the target kernel (vmlinux or a module)
    edition: str  # C function in the update source implementing it
    object: str = VMLINUX  # "vmlinux" or a module name as the kernel knows it ('-' -> '_')
    sympos: int | None = None  # position among same-named symbols, when ambiguous
    line: int | None = None  # line of the [[function]] table in update.toml
    editions: tuple[str, ...] = ()  # multi-edition function: editions 1.. (``edition`` is the dispatcher)
    policy: str | None = None  # adaptation handler: C function choosing the edition per call
    default_edition: int = 1  # edition serving calls when the update loads
    monitor: bool = False  # count and time calls per edition
    kthread: KthreadRestart | None = None  # the main function of a kernel thread, restarted on apply/revert

    @property
    def dispatched(self) -> bool:
        """Whether calls go through a dispatcher choosing among editions (0 = the original)."""
        return bool(self.editions) or self.monitor

    @property
    def control_name(self) -> str:
        """The function's directory under /sys/module/<update>/dynamos/ (livepatch's spelling)."""
        name = self.name if self.object == VMLINUX else f"{self.object}:{self.name}"
        return f"{name},{self.sympos}" if self.sympos else name

    @property
    def original(self) -> str:
        """For a multi-edition function: the C function that runs the kernel's own code."""
        return generated_name(self.name, self.object, self.sympos, role="original")

    @property
    def author_functions(self) -> tuple[str, ...]:
        """C functions the update source must define for this function."""
        if not self.dispatched:
            return (self.edition,)
        return self.editions + ((self.policy,) if self.policy else ())




@dataclass(frozen=True)
class KthreadRestart:
    """How to move a kernel thread whose main function an update replaces onto the new code.

    The thread never returns from its loop, so livepatch's per-task switch would wait for it
    forever; instead the update stops it at a safe point of its loop, carries its state across
    and starts it again running the other side's code (the author's three C hooks).
    """

    stop: str
    start: str
    transfer: str | None = None
    line: int | None = None  # header line of the [[kthread]] table
    index: int = 0  # which [[kthread]] table, for error lines

    @property
    def hooks(self) -> tuple[tuple[str, str], ...]:
        return (("stop", self.stop), ("start", self.start)) + ((("transfer", self.transfer),) if self.transfer else ())


@dataclass(frozen=True)
class SymbolSpec:
    """A non-exported kernel symbol the editions use, resolved by livepatch at load time.

    Needed in update.toml only when the symbol is not a unique vmlinux symbol: it says which
    module holds it, or which of several same-named symbols is meant.
    """

    name: str
    object: str = VMLINUX
    sympos: int | None = None
    line: int | None = None


@dataclass(frozen=True)
class UpdateSource:
    """A validated update source directory."""

    directory: Path
    name: str
    description: str
    functions: tuple[FunctionSpec, ...]
    c_files: tuple[Path, ...]
    kernel: str | None = None  # release it is written for; None means the target's release
    replace: bool = False  # atomic replace of earlier updates (cumulative)
    symbols: tuple[SymbolSpec, ...] = ()  # [[symbol]]: where non-exported symbols live
    consistency: str = "per-task"  # or "global": every function moves to its edition at one instant
    transfer: str | None = None  # global: C hook converting shared data at that instant
    hooks: tuple[tuple[str, str], ...] = ()  # (livepatch callback, C function): state transfer hooks
    hooks_take_object: bool = False  # the hooks take livepatch's struct klp_object * (a patch's KPATCH_ macros)
    states: tuple[tuple[int, int], ...] = ()  # (id, version): system states this update sets up (klp_state)
    version: str | None = None  # the update's own version
    cves: tuple[str, ...] = ()  # the CVEs it fixes
    # build --to: {"package", "from", "to", "partial", "not_carried", "changelog", "cves_mentioned"}
    debian: dict[str, Any] | None = None

    @property
    def toml_path(self) -> Path:
        return self.directory / UPDATE_TOML

    @property
    def livepatch_name(self) -> str:
        """Module and /sys/kernel/livepatch name: the kernel turns '-' into '_' in module names."""
        return self.name.replace("-", "_")

    @property
    def objects(self) -> tuple[str, ...]:
        """Patched objects in first-seen order."""
        return tuple(dict.fromkeys(f.object for f in self.functions))
