"""The lab commands (``dynamos lab ...``) and their options."""

from __future__ import annotations

import argparse
import sys
import time

from dynamos.cli.args import count_arg, name_arg, seconds_arg
from dynamos.cli.present import ProgressPrinter, print_json, table
from dynamos.errors import DynamosError

LAB_NAME = "default"  # the lab that `lab start` and `lab run` use unless --name says otherwise



# ----- lab -------------------------------------------------------------------------------------
def _lab_config(args: argparse.Namespace):
    from dynamos.lab import LabConfig
    from dynamos.lab.machine import default_shares
    from dynamos.target import DEFAULT_LAB_KERNEL

    return LabConfig(kernel=args.kernel or DEFAULT_LAB_KERNEL, cpus=args.cpus, memory_mb=args.memory,
                     shares=default_shares() + list(args.share or []), outputs=list(args.output or []),
                     accel=args.accel, boot_timeout=args.boot_timeout)


def cmd_lab_start(args: argparse.Namespace) -> int:
    from dynamos.lab import start_lab

    progress = ProgressPrinter(args.json or args.quiet)
    lab = start_lab(args.name, _lab_config(args), progress)
    info = {"name": args.name, "kernel": lab.kernel, "accel": lab.info["accel"], "pid": lab.pid,
            "boot_seconds": lab.info["boot_seconds"], "state_dir": str(lab.state_dir)}
    if args.json:
        print_json(info)
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
        print_json({"labs": labs})
    elif not labs:
        print("no lab running")
    else:
        print(table([[lab["name"], lab["kernel"], lab["accel"], str(lab["pid"]), f"{lab['up_seconds']}s"]
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
        result = lab.run(command, timeout=args.timeout, expect_warning=args.expect_warning,
                         on_stdout=None if args.json else out, on_stderr=None if args.json else err)
    if args.json:
        print_json(result.to_json())
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


def add_lab_options(p: argparse.ArgumentParser) -> None:
    # The default is looked up when a lab command runs: parsing must not import dynamos.target,
    # which a production host (the runtime package) does not have.
    p.add_argument("--kernel", default=None, metavar="REL",
                   help="lab kernel release (default: dynamos.target.DEFAULT_LAB_KERNEL)")
    p.add_argument("--name", default=LAB_NAME, type=name_arg("lab name"),
                   help="name of a lab started with 'lab start'")
    p.add_argument("--cpus", type=count_arg, default=2)
    p.add_argument("--memory", type=count_arg, default=1024, metavar="MIB")
    p.add_argument("--share", action="append", metavar="DIR",
                   help="extra host directory visible read-only in the guest at the same path")
    p.add_argument("--output", action="append", metavar="DIR",
                   help="host directory the guest may write, at the same path (nothing else is writable)")
    p.add_argument("--accel", choices=["kvm", "tcg"], default=None,
                   help="force an accelerator (default: KVM only if a probe boot proves it works)")
    p.add_argument("--boot-timeout", type=seconds_arg, default=60.0, metavar="S")
