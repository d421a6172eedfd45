"""Command line: argument parsing and presentation only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dynamos import __version__
from dynamos.errors import DynamosError
from dynamos.target import DEFAULT_LAB_KERNEL

LAB_NAME = "default"  # the lab that `lab start` and `lab run` use unless --name says otherwise


class ProgressPrinter:
    """The terminal presenter of progress: lines on stderr with elapsed time, so stdout stays clean
    for --json. It prints ``str()`` of what it is given: builder messages and the kernel layer's
    ``Progress`` records alike."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, message: object) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# ----- build -----------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from dynamos.builder.kbuild import build_update
    from dynamos.target import resolve_target

    progress = ProgressPrinter(args.json)
    if bool(args.patch) == bool(args.source):
        raise DynamosError("build: give an update source directory, or --patch FILE (not both)")
    target = resolve_target(args.kernel, progress)
    output = Path(args.output) if args.output else Path.cwd()
    if args.patch:
        return _build_patch(args, target, output, progress)
    result = build_update(Path(args.source), target, output=output, progress=progress,
                          module_dirs=[Path(d) for d in args.module_dir or []])
    if args.json:
        _print_json({"package": str(result.package_path), "kernel": target.release,
                     "vermagic": result.vermagic, "seconds": round(result.seconds, 3),
                     "build_dir": str(result.build_dir)})
    else:
        print(f"built {result.package_path} for {target.release} in {result.seconds:.1f} s")
    return 0


def _build_patch(args: argparse.Namespace, target, output: Path, progress: ProgressPrinter) -> int:
    from dynamos.builder.patch import build_from_patch

    result = build_from_patch(Path(args.patch), target, output=output, name=args.name, progress=progress)
    if args.json:
        _print_json({"package": str(result.package_path), "kernel": target.release, "seconds": result.seconds,
                     "phases": result.phases,
                     "units": [{"path": u.path, "touched": u.touched, "object": u.object, "fidelity": u.fidelity,
                                "resolved": u.resolved,
                                "changed": [c.__dict__ for c in u.diff.changed],
                                "new": [c.__dict__ for c in u.diff.new],
                                "new_data": [c.__dict__ for c in u.diff.new_data],
                                "unchanged": len(u.diff.unchanged)} for u in result.units],
                     "skipped": result.skipped,
                     "klp_symbols": [s.to_json() for s in result.klp_symbols]})
        return 0
    if args.explain:
        print("\n".join(result.explain()))
    print(f"built {result.package_path} for {target.release} in {result.seconds:.1f} s")
    return 0


# ----- live operations -------------------------------------------------------------------------
def _present(result, as_json: bool) -> int:
    """An apply/revert result: its JSON for scripts, its one-line description for people."""
    if as_json:
        _print_json(result.to_json())
    else:
        print(result.describe())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from dynamos import kernel

    if args.check:
        report = kernel.LiveKernel().check(Path(args.package))
        if args.json:
            _print_json(report)
            return 0
        print(f"{report['update']}: would apply to {report['kernel']} ({report['consistency']} consistency); "
              "nothing was loaded")
        for note in report["notes"]:
            print(f"  note: {note}")
        for b in report["predicted_blockers"]:
            print(f"  would wait for {b['comm']} (pid {b['pid']}, tid {b['tid']}): {', '.join(b['functions'])} "
                  "on its stack:")
            for frame in b["stack"]:
                print(f"      {frame}")
        if not report["predicted_blockers"]:
            print("  no task has a function of the update on its stack now")
        return 0
    if args.force:
        print("dynamos: warning: --force: if the transition is still blocked at the timeout, the blocking "
              "tasks are switched without the safety check and may keep running the old code; the modules "
              "of updates it replaces can then never be unloaded", file=sys.stderr)
    return _present(kernel.apply(Path(args.package), timeout=args.timeout, progress=ProgressPrinter(args.json),
                                 force=args.force, wait=args.wait), args.json)


def cmd_blockers(args: argparse.Namespace) -> int:
    from dynamos import kernel

    found = kernel.LiveKernel().transition_blockers(args.name)
    if args.json:
        _print_json({name: [b.to_json() for b in blockers] for name, blockers in found.items()})
        return 0
    if not found:
        print("no live update is in transition" if args.name is None else f"{args.name} is not in transition")
        return 0
    for name, blockers in found.items():
        print(f"{name}: {len(blockers)} task(s) not switched yet")
        for b in blockers:
            print("  " + b.describe())
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from dynamos import kernel

    return _present(kernel.revert(args.name, timeout=args.timeout, progress=ProgressPrinter(args.json),
                                  wait=args.wait), args.json)


def cmd_recover(args: argparse.Namespace) -> int:
    from dynamos import kernel

    result = kernel.recover(timeout=args.timeout, wait=args.wait)
    _present(result, args.json)
    return 1 if any(i["outcome"] == "failed" for i in result.items) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from dynamos import kernel

    status = kernel.status(getattr(args, "name", None))
    data = status.to_json()
    if args.json:
        _print_json(data)
        return 0
    print(f"kernel {data['kernel']}, livepatch {'available' if data['livepatch'] else 'NOT available'}")
    for op in data.get("interrupted", []):
        what = "in progress" if op["in_progress"] else "interrupted"
        print(f"{what}: {op['action']} of {op['update']} (pid {op['pid']}, {op['time']}); the kernel shows: "
              f"{op['kernel']}" + ("" if op["in_progress"] else "; run `dynamos recover`"))
    if not data["updates"]:
        print("no live updates")
        return 0
    rows = []
    for u in data["updates"]:
        state = "enabled" if u["enabled"] else "disabled"
        if u["transition"]:
            state += f", in transition ({len(u.get('tasks_pending', []))} tasks pending)"
        if u.get("warning"):
            state += f" - {u['warning']}"
        funcs = ", ".join(
            f["name"] + ("" if f.get("object", "vmlinux") == "vmlinux" else f" [{f['object']}]")
            for f in u["functions"]
        )
        rows.append([u["name"], "dynamos" if u.get("dynamos") else "other", state, funcs])
    print(_table(rows, ["UPDATE", "BY", "STATE", "FUNCTIONS"]))
    for u in data["updates"]:
        for f in u.get("editions", []):
            print(f"\n{u['name']} {f['function']}: route {'; '.join(f['route'])}")
            print(_table([[e["index"], e["name"], e["calls"], e["in_flight"], "live" if e["live"] else "retired"]
                          for e in f["editions"]], ["EDITION", "NAME", "CALLS", "IN-FLIGHT", "STATE"]))
            if "thread" in f:
                t = f["thread"]
                print(f"kernel thread: pid {t.get('pid')} on the {t.get('on')} code, {t.get('restarts')} restart(s), "
                      f"last took {t.get('last_restart_ns', 0) / 1000:.0f} us")
    return 0


# ----- editions --------------------------------------------------------------------------------
def cmd_switch(args: argparse.Namespace) -> int:
    from dynamos.kernel.editions import Selector, switch

    pids = tuple(int(p) for p in args.pids.split(",") if p) if args.pids is not None else None
    selector = Selector(pids=pids, cgroup=args.cgroup, cpus=args.cpus, share=args.share)
    control = switch(args.update, args.function, args.edition, selector, reset=args.reset, wait=args.wait)
    if args.json:
        _print_json(control.to_json())
    else:
        print(f"{control.update} {control.function}: route {'; '.join(control.route())}")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    from dynamos.kernel.editions import RetireTimeout, retire

    try:
        result = retire(args.update, args.function, args.edition, timeout=args.timeout,
                        progress=ProgressPrinter(args.json), wait=args.wait)
    except RetireTimeout as e:
        if args.json:
            _print_json(e.result.to_json())
        for holder in e.result.holders:
            print(f"  {holder['comm']} (pid {holder['pid']}, tid {holder['tid']}):", file=sys.stderr)
            for frame in holder["stack"]:
                print(f"    {frame}", file=sys.stderr)
        raise
    if args.json:
        _print_json(result.to_json())
    else:
        print(f"{result.update} {result.function}: edition {result.edition} ({result.name}) retired; "
              f"no call left in it after {result.seconds:.2f} s")
    return 0


def _monitor_table(rows) -> str:
    def ns(value) -> str:
        if value is None:
            return "-"
        return f"{value / 1000:.1f}us" if value >= 1000 else f"{value:.0f}ns"

    return _table([[r.update, r.function, f"{r.edition}:{r.name}", r.calls, r.in_flight, ns(r.mean_ns),
                    ns(r.p50_ns), ns(r.p99_ns)] for r in rows],
                  ["UPDATE", "FUNCTION", "EDITION", "CALLS", "IN-FLIGHT", "MEAN", "P50<", "P99<"])


def cmd_monitor(args: argparse.Namespace) -> int:
    from dynamos.monitor import build_monitor, monitor_rows

    if args.show:
        if args.functions:
            raise DynamosError("monitor --show takes no function names (it shows every monitored function)")
        while True:
            rows = monitor_rows(update=args.update)
            if args.json:
                _print_json([r.to_json() for r in rows])
                return 0
            text = _monitor_table(rows) if rows else "no monitored functions (start with: dynamos monitor FUNCTION)"
            if args.once:
                print(text)
                return 0
            print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + "dynamos monitor (Ctrl-C to stop)\n" + text,
                  flush=True)
            time.sleep(args.interval)
    if not args.functions:
        raise DynamosError("monitor: name the kernel functions to watch, or use --show")
    from dynamos import kernel
    from dynamos.target import resolve_target

    progress = ProgressPrinter(args.json)
    target = resolve_target(args.kernel, progress)
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="dynamos-monitor-"))
    built = build_monitor(args.functions, target, output, name=args.name, progress=progress)
    if args.build_only:
        print(built.package_path)
        return 0
    result = kernel.apply(built.package_path, timeout=args.timeout, progress=progress)
    if args.json:
        _print_json(result.to_json())
    else:
        print(result.describe())
        print("watch with: dynamos monitor --show; remove with: dynamos revert " + result.name)
    return 0


# ----- lab -------------------------------------------------------------------------------------
def _lab_config(args: argparse.Namespace):
    from dynamos.lab import LabConfig
    from dynamos.lab.vm import default_shares

    return LabConfig(kernel=args.kernel, cpus=args.cpus, memory_mb=args.memory,
                     shares=default_shares() + list(args.share or []), outputs=list(args.output or []),
                     accel=args.accel, boot_timeout=args.boot_timeout)


def cmd_lab_start(args: argparse.Namespace) -> int:
    from dynamos.lab import start_lab

    progress = ProgressPrinter(args.json)
    lab = start_lab(args.name, _lab_config(args), progress)
    info = {"name": args.name, "kernel": lab.kernel, "accel": lab.info["accel"], "pid": lab.pid,
            "boot_seconds": lab.info["boot_seconds"], "state_dir": str(lab.state_dir)}
    if args.json:
        _print_json(info)
    else:
        print(f"lab {args.name!r} up: {lab.kernel} ({lab.info['accel']}) in {lab.info['boot_seconds']:.1f} s; "
              f"console {lab.console_path}")
    return 0


def cmd_lab_stop(args: argparse.Namespace) -> int:
    from dynamos.lab import stop_lab

    stopped = stop_lab(args.name)
    print(f"lab {args.name!r} {'stopped' if stopped else 'was not running'}")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from dynamos.lab import running_labs

    labs = [{"name": lab.state_dir.name, "kernel": lab.kernel, "accel": lab.info["accel"],
             "pid": lab.pid, "shares": lab.info["shares"], "outputs": lab.info.get("outputs", []),
             "up_seconds": round(time.time() - lab.info["started"], 1),
             "console": str(lab.console_path)} for lab in running_labs()]
    if args.json:
        _print_json({"labs": labs})
    elif not labs:
        print("no lab running")
    else:
        print(_table([[lab["name"], lab["kernel"], lab["accel"], str(lab["pid"]), f"{lab['up_seconds']}s"]
                      for lab in labs], ["LAB", "KERNEL", "ACCEL", "PID", "UP"]))
    return 0


def cmd_lab_run(args: argparse.Namespace) -> int:
    from dynamos.lab import EXIT_KERNEL_OOPS, EXIT_TIMEOUT, lab_session

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise DynamosError("lab run: no command given (dynamos lab run -- CMD...)")
    progress = ProgressPrinter(args.json or args.quiet)

    def out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def err(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()

    with lab_session(_lab_config(args), name=args.name, progress=progress) as lab:
        result = lab.run(command, timeout=args.timeout,
                         on_stdout=None if args.json else out, on_stderr=None if args.json else err)
    if args.json:
        _print_json(result.to_json())
    if result.timed_out:
        print(f"dynamos: command timed out after {args.timeout} s and was killed", file=sys.stderr)
        return EXIT_TIMEOUT
    if result.oopsed:
        print("dynamos: the guest kernel reported trouble while the command ran:", file=sys.stderr)
        for line in result.kernel_messages[:20]:
            print(f"  {line}", file=sys.stderr)
        return EXIT_KERNEL_OOPS
    return result.status


def cmd_lab_shell(args: argparse.Namespace) -> int:
    from dynamos.lab import lab_session

    with lab_session(_lab_config(args), name=args.name, progress=ProgressPrinter()) as lab:
        return lab.interactive(["/bin/sh", "-l"] if not args.command else args.command)


# ----- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from dynamos.demo import run_demo

    report = run_demo(kernel=args.kernel, progress=ProgressPrinter(args.json), say=None if args.json else print)
    if args.json:
        _print_json(report.to_json())
    return 0 if report.ok else 1


# ----- parser ----------------------------------------------------------------------------------
def _add_lab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=DEFAULT_LAB_KERNEL, metavar="REL",
                   help=f"lab kernel release (default {DEFAULT_LAB_KERNEL})")
    p.add_argument("--name", default=LAB_NAME, help="name of a lab started with 'lab start'")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", type=int, default=1024, metavar="MIB")
    p.add_argument("--share", action="append", metavar="DIR",
                   help="extra host directory visible read-only in the guest at the same path")
    p.add_argument("--output", action="append", metavar="DIR",
                   help="host directory the guest may write, at the same path (nothing else is writable)")
    p.add_argument("--accel", choices=["kvm", "tcg"], default=None,
                   help="force an accelerator (default: KVM only if a probe boot proves it works)")
    p.add_argument("--boot-timeout", type=float, default=60.0, metavar="S")


def _add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="wait up to S seconds for another dynamos changing this kernel (default: refuse at once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamos", description="Live updates of a running Linux kernel.")
    parser.add_argument("--version", action="version", version=f"dynamos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build an update package from an update source or a source patch")
    p.add_argument("source", nargs="?", help="update source directory (update.toml + C files)")
    p.add_argument("--patch", metavar="FILE", help="a unified diff against the target kernel's source")
    p.add_argument("--name", help="update name for --patch (default: from the patch file name)")
    p.add_argument("--explain", action="store_true",
                   help="with --patch: say per function why it is in the update, per refusal why")
    p.add_argument("-o", "--output", help="package file or directory (default: current directory)")
    p.add_argument("--kernel", metavar="REL", help="target kernel release (default: the running kernel)")
    p.add_argument("--module-dir", action="append", metavar="DIR",
                   help="directory of out-of-tree modules the update patches (their BTF gives prototypes)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("apply", help="apply an update package to this kernel")
    p.add_argument("package")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="transition deadline; past it the update is reverted and unloaded")
    p.add_argument("--check", action="store_true",
                   help="verify and preflight only, and name the tasks that would hold up the transition")
    p.add_argument("--force", action="store_true",
                   help="at the timeout, force the transition instead of reverting (unsafe: blocked tasks "
                        "may keep running old code); never the default")
    p.add_argument("--json", action="store_true")
    _add_wait_option(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("blockers", help="tasks not yet switched by a live update in transition, with stacks")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_blockers)

    p = sub.add_parser("revert", help="disable and unload a live update")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    _add_wait_option(p)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("recover", help="finish or undo operations the action log shows were interrupted")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    _add_wait_option(p)
    p.set_defaults(func=cmd_recover)

    for verb in ("status", "list"):
        p = sub.add_parser(verb, help="live updates on this kernel")
        if verb == "status":
            p.add_argument("name", nargs="?")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("switch", help="choose which edition of a multi-edition function serves calls")
    p.add_argument("update")
    p.add_argument("function", help="kernel function (as in 'dynamos status UPDATE')")
    p.add_argument("edition", nargs="?", help="edition number (0 = the kernel's original) or name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pids", metavar="P,...", help="only calls from these pids/tgids")
    which.add_argument("--cgroup", metavar="PATH", help="only calls from tasks in this cgroup v2 (or below)")
    which.add_argument("--cpus", metavar="LIST", help="only calls on these CPUs, e.g. 0-1,3")
    which.add_argument("--share", type=float, metavar="PCT", help="this percentage of calls, spread evenly")
    which.add_argument("--reset", action="store_true", help="back to the route the update was loaded with")
    p.add_argument("--json", action="store_true")
    _add_wait_option(p)
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("retire", help="take an edition out of service and wait for its calls to finish")
    p.add_argument("update")
    p.add_argument("function")
    p.add_argument("edition")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")
    p.add_argument("--json", action="store_true")
    _add_wait_option(p)
    p.set_defaults(func=cmd_retire)

    p = sub.add_parser("monitor", help="count and time calls of kernel functions (a monitoring update)")
    p.add_argument("functions", nargs="*", metavar="FUNCTION", help="NAME or MODULE:NAME")
    p.add_argument("--show", action="store_true", help="show monitored functions (refreshing; --json: once)")
    p.add_argument("--update", help="with --show: only this update")
    p.add_argument("--once", action="store_true", help="with --show: print the table once")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--name", help="update name (default: monitor-<function>)")
    p.add_argument("--kernel", metavar="REL", help="target kernel release (default: the running kernel)")
    p.add_argument("-o", "--output", help="where to keep the package")
    p.add_argument("--build-only", action="store_true", help="build the package, do not apply it")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("demo", help="boot the lab and show a live update applied and reverted")
    p.add_argument("--kernel", default=DEFAULT_LAB_KERNEL, metavar="REL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="QEMU labs running a target kernel").add_subparsers(dest="lab_command",
                                                                                         required=True)
    p = lab.add_parser("start", help="boot a lab that stays up for later commands")
    _add_lab_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_start)
    p = lab.add_parser("stop", help="power a lab off")
    p.add_argument("--name", default=LAB_NAME)
    p.set_defaults(func=cmd_lab_stop)
    p = lab.add_parser("status", help="running labs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_status)
    p = lab.add_parser("run", help="run a command as root in a lab (a running one, else a new one)")
    _add_lab_options(p)
    p.add_argument("--timeout", type=float, default=None, metavar="S")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lab_run)
    p = lab.add_parser("shell", help="interactive shell in a lab")
    _add_lab_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lab_shell)
    return parser


def main(argv: list[str] | None = None, on_error: Callable[[str], None] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DynamosError as e:
        print(f"dynamos: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("dynamos: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
