"""Guest side of tests/lab/test_faults_lab.py: kill -9 and Ctrl-C dynamos at every registered phase
of apply, revert and switch, then check what it left; then an unwritable and a full log, and full
state directories. Prints one JSON report on stdout.

Usage (as root in the lab): fault_walk.py BANNER_PKG GLOBAL_PKG EDITIONS_PKG

Each faulted command is a child process running the CLI (``dynamos.cli.main``, forked from this
one so the guest pays Python's start-up once) with ``DYNAMOS_TEST_FAULT`` set and SIGINT handled
as at a terminal. After it: status (in this process) must match /sys/kernel/livepatch and
/proc/modules and list the operation as interrupted exactly when the journal could not account
for it; recover must resolve it; no dynamos module may be left half-loaded; and an update status
calls applied must serve /proc/cmdline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from dynamos.cli import main as cli_main
from dynamos.kernel import LiveKernel, editions
from dynamos.kernel.phases import FAULT_ENV, GLOBAL_ONLY, PHASES

BANNER, GLOBAL, EDITIONS = "cmdline_banner", "cmdline_global", "cmdline_editions"
PREFIX = {BANNER: "[live-updated by dynamos] ", GLOBAL: "[global banner] "}
FUNCTION = "cmdline_proc_show"
ORIGINAL = Path("/proc/cmdline").read_text()
OUT = Path("/tmp/fault-walk.out")
LOG = Path("/var/log/dynamos/actions.log")
# The phases at which a killed operation has written its intent but not its result.
OPEN = {"apply": PHASES["apply"][PHASES["apply"].index("intent-logged"):-1],
        "revert": PHASES["revert"][PHASES["revert"].index("intent-logged"):-1],
        "switch": PHASES["switch"][PHASES["switch"].index("intent-logged"):-1]}


class Failed(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def run_cli(argv: list[str], fault: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``dynamos ARGV`` in a child process: (exit status, or -signal; its output)."""
    pid = os.fork()
    if pid == 0:  # the child: exits only through os._exit, never back into the walk
        code = 99
        try:
            fd = os.open(OUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
            os.environ.update(env or {})
            if fault:
                os.environ[FAULT_ENV] = fault
            code = cli_main(argv)
        except BaseException:  # noqa: BLE001 - anything escaping the CLI is a finding, reported
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, OUT.read_text(errors="replace")


def proc_modules() -> dict[str, tuple[str, str]]:
    """Loaded modules: name -> (state, taint flags)."""
    out = {}
    for line in Path("/proc/modules").read_text().splitlines():
        p = line.split()
        out[p[0]] = (p[4], p[6].strip("()") if len(p) > 6 else "")
    return out


def livepatch_dirs() -> dict[str, tuple[bool, bool]]:
    root = Path("/sys/kernel/livepatch")
    out = {}
    for d in root.iterdir():
        try:
            out[d.name] = ((d / "enabled").read_text().strip() == "1", (d / "transition").read_text().strip() == "1")
        except OSError:
            pass  # freed while we looked
    return out


def status_is_true() -> dict[str, Any]:
    """Status, checked against the kernel's own files."""
    for _ in range(50):  # a disabled patch's directory is freed asynchronously: let it settle
        st = LiveKernel().status().to_json()
        dirs, mods = livepatch_dirs(), proc_modules()
        listed = {u["name"]: u for u in st["updates"]}
        ours = {n for n, (_, taints) in mods.items() if "K" in taints} | set(dirs)
        if set(listed) == ours and all((listed[n]["enabled"], listed[n]["transition"]) == v
                                       for n, v in dirs.items() if n in listed):
            return st
        time.sleep(0.1)
    shown = [(u["name"], u["enabled"], u["transition"]) for u in listed.values()]
    raise Failed(f"status lists {shown}, "
                 f"the kernel has livepatches {dirs} and livepatch modules {sorted(ours)}")


def none_half_loaded() -> None:
    mods, dirs = proc_modules(), livepatch_dirs()
    for name, (state, taints) in mods.items():
        if "K" in taints:
            check(state == "Live", f"module {name} is {state}")
            check(name in dirs, f"module {name} is loaded with no /sys/kernel/livepatch/{name}")
    for name, (_, transition) in dirs.items():
        check(not transition, f"livepatch {name} is still in transition")


def applied(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The updates status calls applied (enabled, transition over, global switch on the new side)."""
    return {u["name"]: u for u in st["updates"] if u["enabled"] and not u["transition"]
            and u.get("global_switch") in (None, "new")}


def serves_calls(st: dict[str, Any]) -> None:
    """What status says is applied is what /proc/cmdline shows."""
    live = applied(st)
    text = Path("/proc/cmdline").read_text()
    for u in st["updates"]:
        check(u["name"] in live or not u["enabled"] or u["transition"] or u.get("global_switch") != "old",
              f"{u['name']} is enabled but serves edition 0 (global switch old)")
    expected = ORIGINAL
    if BANNER in live or GLOBAL in live:
        expected = PREFIX[BANNER if BANNER in live else GLOBAL] + ORIGINAL
    elif EDITIONS in live:
        (f,) = live[EDITIONS]["editions"]
        default = [r for r in f["route"] if r.startswith("default ")]
        edition = int(default[0].split()[1]) if default else 0
        expected = (f"[edition {edition}] " if edition else "") + ORIGINAL
    check(text == expected, f"/proc/cmdline is {text!r}, expected {expected!r}: status says applied {sorted(live)}")


def revert_all() -> None:
    k = LiveKernel()
    for name in list(livepatch_dirs()) or []:
        k.revert(name)
    for name, (_, taints) in proc_modules().items():
        if "K" in taints:
            k.revert(name)
    check(Path("/proc/cmdline").read_text() == ORIGINAL, "cleanup left /proc/cmdline changed")
    check(not livepatch_dirs() and not any("K" in t for _, t in proc_modules().values()), "cleanup left a livepatch")


def ensure(name: str, pkg: str) -> None:
    if name not in applied(LiveKernel().status().to_json()):
        revert_all()
        LiveKernel().apply(pkg)


def case(operation: str, phase: str, sig: str, name: str, pkg: str) -> dict[str, Any]:
    """Stop ``operation`` at ``phase`` with ``sig``, check what is left, clean up."""
    t0 = time.monotonic()
    item: dict[str, Any] = {"operation": operation, "phase": phase, "signal": sig, "update": name}
    if operation == "apply":
        revert_all()
        argv = ["apply", pkg]
    elif operation == "revert":
        ensure(name, pkg)
        argv = ["revert", name]
    else:
        ensure(name, pkg)
        editions.switch(name, FUNCTION, None, reset=True)
        argv = ["switch", name, FUNCTION, "2"]
    code, out = run_cli(argv, f"{operation}:{phase}:{sig}")
    item["exit"] = code
    item["output"] = out[-400:]
    if sig == "KILL":
        check(code == -signal.SIGKILL, f"exit {code}, not killed: the phase was not reached")
    else:
        check(code != 0 and "interrupted" in out, f"exit {code} without 'interrupted': the phase was not reached")
        check("Traceback" not in out, "a traceback")
    st = status_is_true()
    pending = [i for i in st.get("interrupted", []) if i["update"] == name and i["action"] == operation]
    expect_open = sig == "KILL" and phase in OPEN[operation]
    check(len(pending) == (1 if expect_open else 0) and len(st.get("interrupted", [])) == len(pending),
          f"status lists interrupted {st.get('interrupted')}, expected {'one' if expect_open else 'none'}")
    check(not pending or pending[0]["in_progress"] is False, "a dead operation shown in progress")
    item["kernel_before_recover"] = pending[0]["kernel"] if pending else None
    if expect_open and operation == "apply" and phase != "intent-logged" and name in {u["name"] for u in st["updates"]}:
        check(next(u for u in st["updates"] if u["name"] == name)["dynamos"], "a killed apply's update is not dynamos'")
    recovered = LiveKernel().recover()
    item["recovered"] = [f"{i['outcome']}: {i['detail']}"[:200] for i in recovered.items]
    check(all(i["outcome"] != "failed" for i in recovered.items), f"recover failed: {item['recovered']}")
    st = status_is_true()
    check("interrupted" not in st, f"still interrupted after recover: {st.get('interrupted')}")
    none_half_loaded()
    serves_calls(st)
    item["applied_after"] = sorted(applied(st))
    if operation != "switch":
        revert_all()
    item["seconds"] = round(time.monotonic() - t0, 2)
    return item


def cases(pkgs: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    out = []
    for operation in ("apply", "revert", "switch"):
        for phase in PHASES[operation]:
            for sig in ("KILL", "INT"):
                if operation == "switch":
                    name = EDITIONS
                elif phase in GLOBAL_ONLY.get(operation, ()):
                    name = GLOBAL
                else:
                    name = BANNER
                out.append((operation, phase, sig, name, pkgs[name]))
    # Where a global update is left differently from a per-task one: between its transition and
    # its switch, and after its revert's disable.
    out += [("apply", "transitioned", s, GLOBAL, pkgs[GLOBAL]) for s in ("KILL", "INT")]
    out += [("revert", "disabled", s, GLOBAL, pkgs[GLOBAL]) for s in ("KILL", "INT")]
    return out


def sh(script: str) -> str:
    return subprocess.run(["sh", "-c", script], check=True, capture_output=True, text=True).stdout


def nothing_changed(what: str) -> None:
    check(not livepatch_dirs() and not any("K" in t for _, t in proc_modules().values()), f"{what}: a module loaded")
    check(Path("/proc/cmdline").read_text() == ORIGINAL, f"{what}: /proc/cmdline changed")
    check(not list(Path("/run/dynamos/updates").glob("*")), f"{what}: a record left")


def unwritable_log(pkgs: dict[str, str]) -> dict[str, Any]:
    """DYNAMOS_LOG in a read-only place: apply, revert and switch refused with nothing changed."""
    sh("mkdir -p /tmp/faults-ro && mount -t tmpfs -o ro,size=64k none /tmp/faults-ro")
    env = {"DYNAMOS_LOG": "/tmp/faults-ro/actions.log"}
    out: dict[str, Any] = {}
    try:
        revert_all()
        code, text = run_cli(["apply", pkgs[BANNER]], env=env)
        check(code == 5 and "cannot write the action log" in text, f"apply: exit {code}: {text}")
        nothing_changed("apply with a read-only log")
        out["apply"] = text.strip()
        LiveKernel().apply(pkgs[BANNER])
        code, text = run_cli(["revert", BANNER], env=env)
        check(code == 5 and "cannot write the action log" in text, f"revert: exit {code}: {text}")
        serves_calls(status_is_true())
        check(BANNER in applied(status_is_true()), "revert with a read-only log changed the update")
        out["revert"] = text.strip()
        revert_all()
        LiveKernel().apply(pkgs[EDITIONS])
        code, text = run_cli(["switch", EDITIONS, FUNCTION, "2"], env=env)
        check(code == 5 and "cannot write the action log" in text, f"switch: exit {code}: {text}")
        check(Path("/proc/cmdline").read_text() == ORIGINAL, "switch with a read-only log changed the route")
        out["switch"] = text.strip()
        revert_all()
    finally:
        sh("umount /tmp/faults-ro")
    return out


def fill(directory: str) -> None:
    """Fill a tmpfs: what little space is left goes to a filler file."""
    subprocess.run(["sh", "-c", f"dd if=/dev/zero of={directory}/filler bs=1k 2>/dev/null; true"], check=True)


def full_disks(pkgs: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    revert_all()
    # The journal's disk: the log's last page partly used, no free page, so the intent line is torn.
    sh("mkdir -p /tmp/faults-log && mount -t tmpfs -o size=8k none /tmp/faults-log")
    try:
        log = Path("/tmp/faults-log/actions.log")
        log.write_text("".join(json.dumps({"time": "2026-01-01T00:00:00.000+00:00", "action": "note", "name": "x",
                                           "result": "ok", "n": i}) + "\n" for i in range(40)))
        fill("/tmp/faults-log")
        env = {"DYNAMOS_LOG": str(log)}
        code, text = run_cli(["apply", pkgs[BANNER]], env=env)
        check(code == 5 and "cannot write the action log" in text, f"apply on a full log disk: exit {code}: {text}")
        nothing_changed("apply with a full log disk")
        check(all(json.loads(line) for line in log.read_text().splitlines()), "a torn line in the log")
        out["log"] = text.strip()
        os.unlink("/tmp/faults-log/filler")
        code, text = run_cli(["apply", pkgs[BANNER]], env=env)
        check(code == 0, f"apply after freeing the log disk: exit {code}: {text}")
        code, text = run_cli(["revert", BANNER], env=env)
        check(code == 0, f"revert after freeing the log disk: exit {code}: {text}")
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        ops = {e.get("op") for e in entries if e.get("result") == "intent"}
        closed = {e.get("op") for e in entries if e.get("op") and e.get("result") != "intent"}
        check(ops <= closed, "an operation on the freed log looks interrupted")
    finally:
        sh("umount /tmp/faults-log")
    # The state directory (lock and records): one page for the lock, none for a record.
    sh("mkdir -p /run/dynamos && mount -t tmpfs -o size=8k none /run/dynamos && echo 0 > /run/dynamos/lock")
    try:
        fill("/run/dynamos")
        code, text = run_cli(["apply", pkgs[BANNER]])
        check(code == 5 and "No space left" in text and ("record" in text or "lock" in text),
              f"apply with a full /run/dynamos: exit {code}: {text}")
        check(not livepatch_dirs() and not any("K" in t for _, t in proc_modules().values()),
              "apply with a full /run/dynamos loaded a module")
        check(not [p for p in Path("/run/dynamos").rglob("*.tmp")], "a half-written record left")
        out["state"] = text.strip()
        os.unlink("/run/dynamos/filler")
        os.unlink("/run/dynamos/lock")  # an empty lock needs a page for the pid: no room once full
        fill("/run/dynamos")
        code, text = run_cli(["apply", pkgs[BANNER]])
        check(code == 5 and "cannot write the lock" in text, f"apply with no room for the lock: exit {code}: {text}")
        nothing_changed("apply with no room for the lock")
        out["lock"] = text.strip()
    finally:
        sh("umount /run/dynamos")
    check("interrupted" not in LiveKernel().status().to_json(), "a full disk left an operation interrupted")
    # The replay store: the update is applied, with a note, and no half-written entry.
    sh("mkdir -p /var/lib/dynamos/accepted && mount -t tmpfs -o size=4k none /var/lib/dynamos/accepted")
    try:
        fill("/var/lib/dynamos/accepted")
        code, text = run_cli(["apply", pkgs[BANNER]])
        check(code == 0 and "could not record the package as accepted" in text,
              f"apply with a full accepted store: exit {code}: {text}")
        serves_calls(status_is_true())
        check(not [p for p in Path("/var/lib/dynamos/accepted").iterdir() if p.name.endswith(".tmp")],
              "a half-written accepted entry left")
        out["accepted"] = text.strip()
        revert_all()
    finally:
        sh("umount /var/lib/dynamos/accepted")
    return out


def main() -> int:
    pkgs = dict(zip((BANNER, GLOBAL, EDITIONS), sys.argv[1:4], strict=True))
    started = time.monotonic()
    report: dict[str, Any] = {"phases": {op: list(p) for op, p in PHASES.items()}, "cases": [], "failures": []}
    revert_all()
    for operation, phase, sig, name, pkg in cases(pkgs):
        try:
            report["cases"].append(case(operation, phase, sig, name, pkg))
        except Exception as e:  # noqa: BLE001 - every case runs; the report says which failed
            report["failures"].append({"case": [operation, phase, sig, name], "error": str(e),
                                       "output": OUT.read_text(errors="replace")[-600:] if OUT.exists() else "",
                                       "trace": traceback.format_exc()[-800:]})
            try:
                LiveKernel().recover()
                revert_all()
            except Exception as again:  # noqa: BLE001
                report["failures"].append({"case": "cleanup", "error": str(again)})
    report["phase_walk_seconds"] = round(time.monotonic() - started, 1)
    for label, step in (("unwritable_log", unwritable_log), ("full_disk", full_disks)):
        try:
            report[label] = step(pkgs)
        except Exception as e:  # noqa: BLE001
            report["failures"].append({"case": label, "error": str(e), "trace": traceback.format_exc()[-800:]})
            try:
                revert_all()
            except Exception:  # noqa: BLE001
                pass
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
