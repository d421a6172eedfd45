"""Command line: argument parsing and presentation only; the work is in the library."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dynamos import __version__
from dynamos.cli.args import (
    add_trust_store_option,
    add_wait_option,
    cpus_arg,
    name_arg,
    pids_arg,
    regex_arg,
    seconds_arg,
    share_arg,
)
from dynamos.cli.commands import (
    cmd_apply,
    cmd_blockers,
    cmd_build,
    cmd_demo,
    cmd_info,
    cmd_monitor,
    cmd_recover,
    cmd_retire,
    cmd_revert,
    cmd_signer_new,
    cmd_status,
    cmd_switch,
)
from dynamos.cli.docs import bash_completion, finish, man_page
from dynamos.cli.lab import (
    LAB_NAME,
    add_lab_options,
    cmd_lab_run,
    cmd_lab_shell,
    cmd_lab_start,
    cmd_lab_status,
    cmd_lab_stop,
)
from dynamos.cli.persist import add_persistence_commands
from dynamos.cli.present import print_json
from dynamos.errors import DynamosError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake raised (exit 64, and JSON with --json) instead of exiting 2,
    the status dynamos gives an invalid update source. Subcommand parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynamos", description="Live updates of a running Linux kernel.")
    parser.add_argument("--version", action="version", version=f"dynamos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build an update package from an update source or a source patch")
    p.add_argument("source", nargs="?", help="update source directory (update.toml + C files)")
    p.add_argument("--patch", metavar="FILE", help="a unified diff against the target kernel's source")
    p.add_argument("--to", metavar="VERSION", help="a later Debian version of the kernel's source package: one "
                   "cumulative update (replace) of every change from the version the kernel runs to VERSION")
    p.add_argument("--max-units", type=int, default=None, metavar="N",
                   help="with --to: refuse a header reaching more translation units than N (default 20)")
    p.add_argument("--name", type=name_arg("update name"),
                   help="update name for --patch (default: from the patch file name)")
    p.add_argument("--explain", action="store_true",
                   help="with --patch or --to: say per function why it is in the update, per refusal why")
    p.add_argument("-o", "--output", help="package file or directory (default: current directory)")
    p.add_argument("--kernel", metavar="REL", help="target kernel release (default: the running kernel)")
    p.add_argument("--module-dir", action="append", metavar="DIR",
                   help="directory of out-of-tree modules the update patches (their BTF gives prototypes)")
    p.add_argument("--signer", metavar="DIR", help="signer directory (default: $DYNAMOS_SIGNER, else "
                   "/etc/dynamos/signer, else the lab key made on first use)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("signer", help="make a signer: the keys that sign packages and their modules")
    signer_sub = p.add_subparsers(dest="signer_command", required=True)
    p = signer_sub.add_parser("new", help="make a signer directory (X.509 module key + OpenPGP package key)")
    p.add_argument("directory")
    p.add_argument("--name", required=True, help="who signs, as hosts will see it (e.g. 'Example Corp fixes')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_signer_new)

    p = sub.add_parser("apply", help="apply an update package to this kernel")
    p.add_argument("package")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S",
                   help="transition deadline; past it the update is reverted and unloaded")
    p.add_argument("--check", action="store_true",
                   help="verify and preflight only, and name the tasks that would hold up the transition")
    p.add_argument("--force", action="store_true",
                   help="at the timeout, force the transition instead of reverting (unsafe: blocked tasks "
                        "may keep running old code); never the default")
    add_trust_store_option(p)
    p.add_argument("--allow-unsigned", action="store_true", help="load an unsigned package (development only; warned)")
    p.add_argument("--allow-older", action="store_true",
                   help="load a package older than the newest one accepted for the same update")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("blockers", help="tasks not yet switched by a live update in transition, with stacks")
    p.add_argument("name", nargs="?", type=name_arg("update name"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_blockers)

    p = sub.add_parser("revert", help="disable and unload a live update")
    p.add_argument("name", type=name_arg("update name"))
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("recover", help="finish or undo operations the action log shows were interrupted")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_recover)

    for verb in ("status", "list"):
        p = sub.add_parser(verb, help="live updates on this kernel")
        if verb == "status":
            p.add_argument("name", nargs="?", type=name_arg("update name"))
        p.add_argument("--uname", action="store_true",
                       help="print only the effective kernel: the release plus the updates whose code runs")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("info", help="what a package is, who signed it and what it fixes, without applying it")
    p.add_argument("package")
    add_trust_store_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("switch", help="choose which edition of a multi-edition function serves calls")
    p.add_argument("update", type=name_arg("update name"))
    p.add_argument("function", type=name_arg("function name"), help="kernel function (as in 'dynamos status UPDATE')")
    p.add_argument("edition", nargs="?", type=name_arg("edition"),
                   help="edition number (0 = the kernel's original) or name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pids", type=pids_arg, metavar="P,...", help="only calls from these pids/tgids")
    which.add_argument("--cgroup", metavar="PATH", help="only calls from tasks in this cgroup v2 (or below)")
    which.add_argument("--cpus", type=cpus_arg, metavar="LIST", help="only calls on these CPUs, e.g. 0-1,3")
    which.add_argument("--share", type=share_arg, metavar="PCT", help="this percentage of calls, spread evenly")
    which.add_argument("--reset", action="store_true", help="back to the route the update was loaded with")
    p.add_argument("--persist", action="store_true",
                   help="also store the route with the installed package: boot restores it (pid and cgroup "
                        "rules excepted); with --reset, forget the stored route")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_switch)

    add_persistence_commands(sub, name_arg, seconds_arg, add_wait_option)

    p = sub.add_parser("retire", help="take an edition out of service and wait for its calls to finish")
    p.add_argument("update", type=name_arg("update name"))
    p.add_argument("function", type=name_arg("function name"))
    p.add_argument("edition", type=name_arg("edition"))
    p.add_argument("--timeout", type=seconds_arg, default=10.0, metavar="S")
    p.add_argument("--json", action="store_true")
    add_wait_option(p)
    p.set_defaults(func=cmd_retire)

    p = sub.add_parser("monitor", help="count and time calls of kernel functions (a monitoring update)")
    p.add_argument("functions", nargs="*", metavar="FUNCTION", type=name_arg("function name"),
                   help="NAME or MODULE:NAME")
    p.add_argument("--show", action="store_true", help="show monitored functions (refreshing; --json: once)")
    p.add_argument("--update", type=name_arg("update name"), help="with --show: only this update")
    p.add_argument("--once", action="store_true", help="with --show: print the table once")
    p.add_argument("--interval", type=seconds_arg, default=1.0, metavar="S")
    p.add_argument("--name", type=name_arg("update name"), help="update name (default: monitor-<function>)")
    p.add_argument("--kernel", metavar="REL", help="target kernel release (default: the running kernel)")
    p.add_argument("-o", "--output", help="where to keep the package")
    p.add_argument("--build-only", action="store_true", help="build the package, do not apply it")
    p.add_argument("--timeout", type=seconds_arg, default=30.0, metavar="S")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("demo", help="boot the lab and show a live update applied and reverted")
    p.add_argument("--kernel", default=None, metavar="REL", help="default: the pinned lab kernel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="QEMU labs running a target kernel").add_subparsers(dest="lab_command",
                                                                                         required=True)
    p = lab.add_parser("start", help="boot a lab that stays up for later commands")
    add_lab_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_start)
    p = lab.add_parser("stop", help="power a lab off")
    p.add_argument("--name", default=LAB_NAME, type=name_arg("lab name"))
    p.set_defaults(func=cmd_lab_stop)
    p = lab.add_parser("status", help="running labs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_status)
    p = lab.add_parser("run", help="run a command as root in a lab (a running one, else a new one)")
    add_lab_options(p)
    p.add_argument("--timeout", type=seconds_arg, default=None, metavar="S")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--expect-warning", type=regex_arg, metavar="REGEX",
                   help="a kernel warning the command provokes on purpose (regex on its WARNING/BUG line): "
                        "not counted as trouble")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lab_run)
    p = lab.add_parser("shell", help="interactive shell in a lab")
    add_lab_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lab_shell)

    p = sub.add_parser("docs", help="print the man page or the bash completion script, made from this parser")
    p.add_argument("what", choices=["man", "bash-completion"])
    p.set_defaults(func=cmd_docs)
    return finish(parser)


def cmd_docs(args: argparse.Namespace) -> int:
    parser = build_parser()
    sys.stdout.write(man_page(parser) if args.what == "man" else bash_completion(parser))
    return 0


def _fail(message: str, status: int, as_json: bool, refusals: list[dict[str, str]] | None = None,
          details: dict | None = None) -> int:
    """Report a failure: the message on stderr, and with --json one object on stdout that says
    the same (with the error's details, e.g. a retire's holders), so a script reads why from the
    output it parses."""
    print(f"dynamos: {message}", file=sys.stderr)
    if as_json:
        print_json({**(details or {}), "ok": False, "exit_status": status,
                    "error": message.removeprefix("error: "), "refusals": refusals or []})
    return status


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    as_json = "--json" in words[:words.index("--")] if "--" in words else "--json" in words
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except DynamosError as e:
        if "-v" in words or "--verbose" in words:  # the causes behind the message, for a bug report
            traceback.print_exception(e, file=sys.stderr)
        return _fail(f"error: {e}", e.exit_status, as_json, e.refusals(), e.details())
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except ModuleNotFoundError as e:  # a production host has the runtime package only
        if not (e.name or "").startswith(("dynamos.", "elftools")):
            raise
        return _fail(f"error: this command needs the build tools ({e.name} is not installed): install the "
                     "dynamos-builder package", 1, as_json)
    except BrokenPipeError:
        os._exit(0)
    except OSError as e:  # a file the user named is missing or unreadable: say so, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"error: {where}{e.strerror or e}", 1, as_json)

