"""install, uninstall, load --all, gc, installed: updates kept across reboots (the work is in
``dynamos.kernel.installed``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynamos.cli.args import add_trust_store_option
from dynamos.cli.present import ProgressPrinter, print_json, table
from dynamos.errors import UsageError


def _kernel(args: argparse.Namespace, trust: bool = False):
    from dynamos.kernel import Installer, LiveKernel

    if trust:
        from dynamos.kernel.trust import TrustPolicy
        from dynamos.update.signature import trust_store_path

        return Installer(LiveKernel(lock_wait=args.wait, trust=TrustPolicy(trust_store_path(args.trust_store))))
    return Installer(LiveKernel(lock_wait=getattr(args, "wait", None)))


def _present(result, as_json: bool) -> int:
    if as_json:
        print_json(result.to_json())
    else:
        print(result.describe())
    return result.exit_status


def cmd_install(args: argparse.Namespace) -> int:
    return _present(_kernel(args, trust=True).install(Path(args.package), apply=not args.no_apply,
                                                      timeout=args.timeout, progress=ProgressPrinter(args.json)),
                    args.json)


def cmd_uninstall(args: argparse.Namespace) -> int:
    return _present(_kernel(args).uninstall(args.name, release=args.kernel, timeout=args.timeout,
                                            progress=ProgressPrinter(args.json)), args.json)


def cmd_load(args: argparse.Namespace) -> int:
    if not args.all:
        raise UsageError("load: give --all (every update installed for this kernel); `dynamos apply PKG` "
                         "loads one package")
    result = _kernel(args, trust=True).load_all(timeout=args.timeout, progress=ProgressPrinter(args.json))
    if not args.json:
        for item in result.items:  # one line per package: what boot's journal shows
            print(f"dynamos: {item['name']} ({item['release']}): {item['outcome']}"
                  + (f": {item['message']}" if item.get("message") else ""))
            for error in item.get("route_errors", []):
                print(f"dynamos: {item['name']}: {error}")
        if not result.items:
            print("dynamos: no update is installed for this kernel")
        for note in result.notes:
            print(f"dynamos: {note}", file=sys.stderr)
        return result.exit_status
    return _present(result, True)


def cmd_gc(args: argparse.Namespace) -> int:
    return _present(_kernel(args).gc(), args.json)


def cmd_installed(args: argparse.Namespace) -> int:
    rows = _kernel(args).listing()
    if args.json:
        print_json({"installed": rows})
        return 0
    if not rows:
        print("no update is installed")
        return 0
    print(table([[r["order"], r["name"], r["release"], "yes" if r["replace"] else "",
                  "live" if r["live"] else ("-" if r["running_release"] else "other kernel"),
                  "; ".join(f"{f}: {', '.join(lines)}" for f, lines in r["routes"].items())] for r in rows],
                ["ORDER", "UPDATE", "KERNEL", "REPLACE", "STATE", "STORED ROUTES"]))
    return 0


def add_persistence_commands(sub, name_arg, seconds_arg, add_wait_option) -> None:
    p = sub.add_parser("install", help="keep an update package for every boot (and apply it now)")
    p.add_argument("package")
    p.add_argument("--no-apply", action="store_true", help="only store it; it loads at the next boot")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S")
    add_trust_store_option(p)
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="revert an installed update if live, and remove it")
    p.add_argument("name", type=name_arg("update name"))
    p.add_argument("--kernel", type=name_arg("kernel release"), metavar="REL",
                   help="the release it is installed for (default: the running kernel)")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("load", help="load installed updates (boot runs `dynamos load --all`)")
    p.add_argument("--all", action="store_true", help="every update installed for the running kernel")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S", help="per update")
    add_trust_store_option(p)
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("gc", help="remove installed packages of kernel releases no longer installed")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("installed", help="installed updates, per kernel release, in install order")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_installed)
