"""A simulated kernel: a fake /proc and /sys tree plus syscalls that act on it.

It lets everything above the kernel layer (and the kernel layer's own tests) run apply, revert
and status end to end without root or a VM: ``init_module`` registers a livepatch in the fake
sysfs, and every ``sleep`` (one poll of the caller) advances the transition the way livepatch
does, per task. Tasks can be *blocked* (they never switch state) to reproduce stuck
transitions. The real code path is exercised by the lab tests.

A simulated module image is a small relocatable ELF (see ``simulated_module_image``): ``.modinfo`` and
``.gnu.linkonce.this_module`` name the module as Kbuild's would, and a section holds a marker and
JSON saying which livepatch it registers (which may differ from its name, to test that check).
The simulated kernel refuses anything without the marker with ENOEXEC.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamos.abi import CONTROL_DIR, EDITIONS_FILE, GLOBAL_FILE, ROUTE_FILE, VMLINUX

DEFAULT_RELEASE = "6.1.0-56-amd64"
IMAGE_MAGIC = b"dynamos-simulated-module\n"


def _elf(sections: list[tuple[str, bytes]]) -> bytes:
    """A minimal ELF64 little-endian relocatable object holding ``sections`` (no symbols)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + b".shstrtab\0"
    body, headers, offset = b"", [bytes(64)], 64
    name_at = 1
    for n, data in [*sections, (".shstrtab", names)]:
        headers.append(struct.pack("<IIQQQQIIQQ", name_at, 1 if n != ".shstrtab" else 3, 0, 0,
                                   offset + len(body), len(data), 0, 0, 1, 0))
        name_at += len(n) + 1
        body += data
    shoff = 64 + len(body)
    header = (b"\x7fELF\x02\x01\x01" + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers), len(headers) - 1))
    return header + body + b"".join(headers)


def simulated_module_image(name: str, functions: list[dict[str, Any]], replace: bool = False, *,
                 global_switch: bool = False, module_name: str | None = None,
                 modinfo_name: str | None = None, editions: dict[str, list[str]] | None = None) -> bytes:
    """A module image the simulated kernel understands: the livepatch it registers (``name``),
    the module name its ELF carries (``module_name``/``modinfo_name``, default ``name``), and its
    multi-edition functions (``editions``: control directory -> edition names, 0 the original;
    the route loads on edition 1)."""
    spec: dict[str, Any] = {"name": name, "functions": functions, "replace": replace, "global": global_switch}
    if editions:  # only then: other tests' images stay byte for byte what they were
        spec["editions"] = editions
    this_module = bytearray(0x380)
    own = (module_name or name).encode()[:55]
    this_module[24:24 + len(own)] = own
    modinfo = f"vermagic=simulated\0name={modinfo_name or module_name or name}\0".encode()
    return _elf([(".modinfo", modinfo), (".gnu.linkonce.this_module", bytes(this_module)),
                 (".dynamos.sim", IMAGE_MAGIC + json.dumps(spec).encode())])


@dataclass
class SimTask:
    pid: int
    tid: int
    comm: str
    stack: list[str]
    blocked: bool = False  # never switches patch state (sleeps in a patched function)
    state: int = -1
    wakes_on_signal: bool = False  # a blocked task that livepatch's fake signal gets to switch


@dataclass
class SimPatch:
    name: str
    functions: list[dict[str, Any]]
    replace: bool
    enabled: bool = True
    transition: bool = True
    polls_left: int | None = 0
    free_in: int | None = None  # polls until a disabled/replaced patch is freed from sysfs


@dataclass
class SimModule:
    name: str
    livepatch: bool = True
    refs: int = 0


@dataclass
class SimulatedKernel:
    """State of the simulated kernel; implements the ``Syscalls`` protocol."""

    root: Path
    kernel_release: str = DEFAULT_RELEASE
    euid: int = 0
    transition_polls: int | None = 2  # polls before unblocked tasks switch; None: they never do
    free_polls: int = 1  # polls before a disabled patch leaves sysfs (livepatch frees it async)
    tracefs_mounted: bool = True
    lockdown: str = "none"
    sig_enforce: bool = False
    load_error: int | None = None  # errno init_module fails with
    refuse_modules: set[str] = field(default_factory=set)  # livepatches whose load fails (EINVAL)
    load_messages: list[str] = field(default_factory=list)  # kernel log lines the failure adds
    mount_error: int | None = None
    now: float = 1000.0
    symbols: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, object)
    traceable: list[tuple[str, str]] = field(default_factory=list)  # (name, object)
    tasks: list[SimTask] = field(default_factory=list)
    patches: dict[str, SimPatch] = field(default_factory=dict)
    modules: dict[str, SimModule] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)  # syscalls made, in order
    kmsg: list[str] = field(default_factory=list)
    polls: int = 0
    global_state: dict[str, str] = field(default_factory=dict)  # update -> "old"/"new" (global consistency)
    global_refuse: set[str] = field(default_factory=set)  # directions the global switch finds busy
    # (module, function) -> edition names and route lines (the control files of a multi-edition function)
    editions: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    routes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.tasks:
            self.tasks = [
                SimTask(1, 1, "systemd", ["[<0>] ep_poll+0x2a/0x40"]),
                SimTask(500, 500, "sshd", ["[<0>] do_select+0x1/0x2"]),
                SimTask(500, 501, "sshd-worker", ["[<0>] futex_wait+0x1/0x2"]),
            ]
        self.render()

    # -- building the scene ---------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change settings (``lockdown``, ``euid``, ``transition_polls``...) and show them in the files."""
        for key, value in changes.items():
            if not hasattr(self, key):
                raise AttributeError(f"SimulatedKernel has no setting {key}")
            setattr(self, key, value)
        self.render()

    def add_symbol(self, name: str, object: str = VMLINUX, kind: str = "t", traceable: bool = True) -> None:
        self.symbols.append((name, kind, object))
        if traceable and kind in "tTwW":
            self.traceable.append((name, object))
        self.render()

    def add_module(self, name: str, livepatch: bool = False) -> None:
        self.modules[name] = SimModule(name, livepatch)
        self.render()

    def add_task(self, pid: int, comm: str, stack: list[str], tid: int | None = None,
                 blocked: bool = False, wakes_on_signal: bool = False) -> SimTask:
        task = SimTask(pid, tid if tid is not None else pid, comm, stack, blocked, wakes_on_signal=wakes_on_signal)
        self.tasks.append(task)
        self.render()
        return task

    def reboot(self) -> None:
        """A new boot of the same machine: every livepatch and update module gone, /run empty;
        the disk (/var, /etc) kept."""
        for name in [n for n, m in self.modules.items() if m.livepatch]:
            del self.modules[name]
        self.patches.clear()
        self.global_state.clear()
        self.editions.clear()
        self.routes.clear()
        shutil.rmtree(self.root / "run", ignore_errors=True)
        for t in self.tasks:
            t.state = -1
        self.render()

    # -- Syscalls -------------------------------------------------------------------------

    def init_module(self, image: bytes, params: str = "") -> None:
        self.calls.append(("init_module", len(image)))
        if self.load_error is not None:
            self.kmsg.extend(self.load_messages)
            self.render()
            raise OSError(self.load_error, "init_module")
        at = image.find(IMAGE_MAGIC)
        if not image.startswith(b"\x7fELF") or at < 0:
            raise OSError(errno.ENOEXEC, "init_module")
        spec, _ = json.JSONDecoder().raw_decode(image[at + len(IMAGE_MAGIC):].decode(errors="replace"))
        name = spec["name"]
        if name in self.refuse_modules:
            self.kmsg.append(f"{name}: module verification failed (simulated)")
            self.render()
            raise OSError(errno.EINVAL, "init_module")
        if name in self.modules:
            raise OSError(errno.EEXIST, "init_module")
        if any(p.transition for p in self.patches.values()):
            raise OSError(errno.EBUSY, "init_module")
        self.modules[name] = SimModule(name, True, refs=1)
        self.patches[name] = SimPatch(name, spec["functions"], spec.get("replace", False),
                                      polls_left=self.transition_polls)
        if spec.get("global"):
            self.global_state[name] = "old"
        for function, names in spec.get("editions", {}).items():
            self.editions[name, function] = names
            self.routes[name, function] = ["default 1"]
        self.kmsg.append(f"livepatch: enabling patch '{name}'")
        for t in self.tasks:
            t.state = 0  # every task starts unpatched and moves to the target
        self.render()

    def delete_module(self, name: str, flags: int = 0) -> None:
        self.calls.append(("delete_module", name))
        module = self.modules.get(name)
        if module is None:
            raise OSError(errno.ENOENT, "delete_module")
        if module.refs:
            raise OSError(errno.EAGAIN, "delete_module")
        del self.modules[name]
        self.global_state.pop(name, None)
        for key in [k for k in self.editions if k[0] == name]:
            del self.editions[key], self.routes[key]
        self.render()

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
        self.calls.append(("mount", fstype, target))
        if self.mount_error is not None:
            raise OSError(self.mount_error, "mount")
        self.tracefs_mounted = True
        self.render()

    def geteuid(self) -> int:
        return self.euid

    def release(self) -> str:
        return self.kernel_release

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)
        self.polls += 1
        self.tick()

    # -- livepatch, one poll at a time ----------------------------------------------------

    def write_attribute(self, path: str, value: bytes) -> None:
        """Act like livepatch's ``enabled_store``: synchronously start or reverse a transition;
        or like an update module's ``signal_blockers``: blocked tasks that wake on a signal switch."""
        if Path(path).name == "signal_blockers":
            module = Path(path).relative_to(self.root / "sys/module").parts[0]
            if module not in self.modules:
                raise OSError(errno.ENOENT, path)
            self.calls.append(("signal", module))
            for patch in self.patches.values():
                if patch.transition:
                    for t in self.tasks:
                        if t.blocked and t.wakes_on_signal:
                            t.blocked = False
                            t.state = 1 if patch.enabled else 0
            self.render()
            return
        if Path(path).name == ROUTE_FILE:
            self._route_command(Path(path), value.decode())
            return
        if Path(path).name == GLOBAL_FILE:
            module = Path(path).relative_to(self.root / "sys/module").parts[0]
            direction = value.split()[0].decode()
            self.calls.append(("global", module, direction))
            if module not in self.global_state or direction in self.global_refuse:
                raise OSError(errno.EBUSY, path)
            self.global_state[module] = direction
            self.render()
            return
        rel = Path(path).relative_to(self.root / "sys/kernel/livepatch")
        if len(rel.parts) != 2 or rel.parts[1] != "enabled" or rel.parts[0] not in self.patches:
            raise OSError(errno.ENOENT, path)
        patch = self.patches[rel.parts[0]]
        wanted = value.strip() in (b"1", b"y", b"Y")
        self.calls.append(("write-enabled", patch.name, int(wanted)))
        if patch.free_in is not None or wanted == patch.enabled:
            raise OSError(errno.EINVAL, path)
        busy = any(p.transition for p in self.patches.values() if p is not patch)
        if patch.transition:
            pass  # reversing the transition in flight: tasks keep their state and go back
        elif busy or wanted:
            raise OSError(errno.EBUSY if busy else errno.EINVAL, path)  # no re-enabling a disabled patch
        else:
            for t in self.tasks:
                t.state = 1  # disabling: every task starts patched and moves back
        patch.enabled = wanted
        patch.transition = True
        patch.polls_left = self.transition_polls
        self.render()

    def _route_command(self, path: Path, line: str) -> None:
        """One route command, as the runtime takes it: ``reset``, ``default E``, ``handler on|off``
        or a rule (which replaces an earlier rule of the same kind and edition)."""
        parts = path.relative_to(self.root / "sys/module").parts
        key = (parts[0], parts[2])
        if key not in self.routes:
            raise OSError(errno.ENOENT, str(path))
        self.calls.append(("route", *key, line))
        words = line.split()
        route = self.routes[key]
        if words == ["reset"]:
            route[:] = ["default 1"]
        elif len(words) < 2 or (words[0] != "handler" and not words[1].isdigit()):
            raise OSError(errno.EINVAL, str(path))
        elif words[0] != "handler" and int(words[1]) >= len(self.editions[key]):
            raise OSError(errno.ERANGE, str(path))
        elif words[0] == "default":
            route[0] = line
        else:
            route[:] = [r for r in route if r.split()[:2] != words[:2]] + [line]
        self.render()

    def tick(self) -> None:
        for patch in list(self.patches.values()):
            if patch.free_in is not None:
                patch.free_in -= 1
                if patch.free_in <= 0:
                    del self.patches[patch.name]
                    if patch.name in self.modules:
                        self.modules[patch.name].refs = 0
                continue
            if not patch.transition:
                continue
            target = 1 if patch.enabled else 0
            if patch.polls_left is not None:
                patch.polls_left -= 1
                if patch.polls_left <= 0:
                    for t in self.tasks:
                        if not t.blocked:
                            t.state = target
            if all(t.state == target for t in self.tasks):
                self._complete(patch)
        self.render()

    def _complete(self, patch: SimPatch) -> None:
        patch.transition = False
        for t in self.tasks:
            t.state = -1
        if not patch.enabled:
            patch.free_in = self.free_polls
        elif patch.replace:
            for other in self.patches.values():
                if other is not patch and other.free_in is None:
                    other.enabled = False
                    other.free_in = self.free_polls

    # -- the files ------------------------------------------------------------------------

    def render(self) -> None:
        """Write the simulated state as the files the kernel layer reads."""
        r = self.root
        proc = r / "proc"
        proc.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (name, kind, obj) in enumerate(self.symbols):
            suffix = "" if obj == VMLINUX else f"\t[{obj}]"
            lines.append(f"{0xffffffff81000000 + 16 * i:016x} {kind} {name}{suffix}")
        (proc / "kallsyms").write_text("\n".join(lines) + "\n")
        (proc / "modules").write_text("".join(
            f"{m.name} 16384 {m.refs} - Live 0x0000000000000000{' (OEK)' if m.livepatch else ''}\n"
            for m in self.modules.values()
        ))
        for d in proc.iterdir():
            if d.name.isdigit():
                shutil.rmtree(d)
        for t in self.tasks:
            dirs = [proc / str(t.pid) / "task" / str(t.tid)]
            if t.pid == t.tid:
                dirs.append(proc / str(t.pid))  # the thread group leader's files in /proc/<pid>
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / "comm").write_text(t.comm + "\n")
                (d / "patch_state").write_text(f"{t.state}\n")
                (d / "stack").write_text("".join(f"{frame}\n" for frame in t.stack))

        sec = r / "sys/kernel/security"
        sec.mkdir(parents=True, exist_ok=True)
        (sec / "lockdown").write_text(" ".join(
            f"[{m}]" if m == self.lockdown else m for m in ("none", "integrity", "confidentiality")
        ) + "\n")
        params = r / "sys/module/module/parameters"
        params.mkdir(parents=True, exist_ok=True)
        (params / "sig_enforce").write_text("Y\n" if self.sig_enforce else "N\n")
        for d in (r / "sys/module").iterdir():
            if d.name != "module" and d.name not in self.modules:
                shutil.rmtree(d)
        for m in self.modules.values():
            if m.livepatch:  # every update module has the blocker signal parameter
                (r / "sys/module" / m.name / "parameters").mkdir(parents=True, exist_ok=True)
                (r / "sys/module" / m.name / "parameters/signal_blockers").write_text("0\n")
            for (module, function), names in self.editions.items():
                if module == m.name:
                    d = r / "sys/module" / m.name / CONTROL_DIR / function
                    d.mkdir(parents=True, exist_ok=True)
                    (d / EDITIONS_FILE).write_text("".join(f"{i} {n} 0 0 live\n" for i, n in enumerate(names)))
                    (d / ROUTE_FILE).write_text("".join(f"{line}\n" for line in self.routes[module, function]))
            if m.name in self.global_state:
                (r / "sys/module" / m.name / CONTROL_DIR).mkdir(parents=True, exist_ok=True)
                (r / "sys/module" / m.name / CONTROL_DIR / GLOBAL_FILE).write_text(
                    f"state {self.global_state[m.name]}\nattempts 1\nlongest_stop_ns 1000\n")

        tracing = r / "sys/kernel/tracing"
        if tracing.exists():
            shutil.rmtree(tracing)
        tracing.mkdir(parents=True)
        if self.tracefs_mounted:
            (tracing / "available_filter_functions").write_text("".join(
                f"{n}\n" if o == VMLINUX else f"{n} [{o}]\n" for n, o in self.traceable
            ))
            hooked = []
            for p in self.patches.values():
                for f in p.functions:
                    obj = f.get("object") or VMLINUX
                    hooked.append(f"{f['name']}{'' if obj == VMLINUX else f' [{obj}]'} (1) R I   \t"
                                  "->klp_ftrace_handler+0x0/0x100\n")
            (tracing / "enabled_functions").write_text("".join(hooked))

        lp = r / "sys/kernel/livepatch"
        if lp.exists():
            shutil.rmtree(lp)
        lp.mkdir(parents=True)
        for p in self.patches.values():
            d = lp / p.name
            d.mkdir()
            (d / "enabled").write_text(f"{int(p.enabled)}\n")
            (d / "transition").write_text(f"{int(p.transition)}\n")
            (d / "force").write_text("")
            for f in p.functions:
                obj = f.get("object") or VMLINUX
                od = d / obj
                od.mkdir(exist_ok=True)
                loaded = obj == VMLINUX or obj in self.modules
                (od / "patched").write_text(f"{int(loaded and not p.free_in)}\n")
                (od / f"{f['name']},{f.get('sympos') or 1}").mkdir()

        dev = r / "dev"
        dev.mkdir(exist_ok=True)
        (dev / "kmsg").write_text("".join(f"6,{i},{i * 1000},-;{m}\n" for i, m in enumerate(self.kmsg)))

