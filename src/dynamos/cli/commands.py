"""The commands that build, apply and steer updates: each parses nothing and presents the library's answer."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dynamos.cli.present import ProgressPrinter, print_json, table
from dynamos.errors import DynamosError, UsageError


# ----- build -----------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from dynamos.builder.kbuild import build_update
    from dynamos.target import resolve_target

    progress = ProgressPrinter(args.json or args.quiet)
    if sum(map(bool, (args.patch, args.source, args.to))) != 1:
        raise UsageError("build: give an update source directory, --patch FILE or --to VERSION (one of them)")
    if args.max_units is not None and (not args.to or args.max_units < 1):
        raise UsageError("build: --max-units is a positive number, and only goes with --to")
    target = resolve_target(args.kernel, progress)
    output = Path(args.output) if args.output else Path.cwd()
    if args.patch:
        return _build_patch(args, target, output, progress)
    if args.to:
        return _build_to(args, target, output, progress)
    result = build_update(Path(args.source), target, output=output, progress=progress,
                          module_dirs=[Path(d) for d in args.module_dir or []], signer=_signer(args))
    if args.json:
        print_json({"package": str(result.package_path), "kernel": target.release,
                     "vermagic": result.vermagic, "seconds": round(result.seconds, 3),
                     "build_dir": str(result.build_dir)})
    else:
        print(f"built {result.package_path} for {target.release} in {result.seconds:.1f} s")
    return 0


def _signer(args: argparse.Namespace):
    from dynamos.builder.signing import configured_signer
    from dynamos.target import cache_root

    signer = configured_signer(args.signer, cache_root())
    if not args.json:
        print(f"signing with {signer.name} ({signer.fingerprint[-16:]}, {signer.directory})")
    return signer


def cmd_signer_new(args: argparse.Namespace) -> int:
    from dynamos.builder.signing import new_signer

    signer = new_signer(Path(args.directory), args.name)
    data = {**signer.manifest_signer(), "directory": str(signer.directory),
            "trusted_keyring": str(signer.trusted_keyring), "module_certificate": str(signer.directory / "module.der")}
    if args.json:
        print_json(data)
        return 0
    print(f"made signer {signer.name} in {signer.directory}\n"
          f"  package key (OpenPGP) {signer.fingerprint}: hosts trust it by copying {signer.trusted_keyring}\n"
          f"    into /etc/dynamos/trusted/ (any NAME.gpg)\n"
          f"  module key (X.509) id {signer.module_key_id}: hosts that enforce module signatures need\n"
          f"    {data['module_certificate']} in a kernel keyring (UEFI db, or mokutil --import)")
    return 0


def _build_patch(args: argparse.Namespace, target, output: Path, progress: ProgressPrinter) -> int:
    from dynamos.builder.patch import build_from_patch

    result = build_from_patch(Path(args.patch), target, output=output, name=args.name, progress=progress,
                              signer=_signer(args))
    if args.json:
        print_json({"package": str(result.package_path), "kernel": target.release, "seconds": result.seconds,
                     "phases": result.phases,
                     "units": [{"path": u.path, "touched": u.touched, "object": u.object, "fidelity": u.fidelity,
                                "resolved": u.resolved,
                                "changed": [c.__dict__ for c in u.diff.changed],
                                "new": [c.__dict__ for c in u.diff.new],
                                "new_data": [c.__dict__ for c in u.diff.new_data],
                                "key_sites": [k.__dict__ for k in u.key_sites],
                                "unchanged": len(u.diff.unchanged)} for u in result.units],
                     "skipped": result.skipped,
                     "klp_symbols": [s.to_json() for s in result.klp_symbols]})
        return 0
    if args.explain:
        print("\n".join(result.explain()))
    print(f"built {result.package_path} for {target.release} in {result.seconds:.1f} s")
    return 0


def _build_to(args: argparse.Namespace, target, output: Path, progress: ProgressPrinter) -> int:
    from dynamos.builder.debian import DEFAULT_MAX_UNITS, build_to, check_versions
    from dynamos.target.debversion import archive_versions
    from dynamos.target.source import source_package

    if not output.is_dir():
        raise UsageError(f"build --to: -o {output} must be an existing directory")
    known = archive_versions(source_package(target.release))
    check_versions(target, args.to, known)  # a bad --to is refused before anything else is printed
    result = build_to(target, args.to, output=output, max_units=args.max_units or DEFAULT_MAX_UNITS,
                      progress=progress, signer=_signer(args), known_versions=known)
    if args.json:
        failed = {} if result.package_path else {"exit_status": 4, "error": "nothing could be carried: no package"}
        print_json({"ok": result.package_path is not None, **failed, "kernel": target.release, **result.to_json()})
    else:
        if args.explain and result.explain:
            print("\n".join(result.explain))
        print(table([[f.path, f.status, f.code, f.reason[:100]] for f in result.files],
                    ["FILE", "STATUS", "CODE", "REASON"]))
        if result.cves_mentioned:
            claim = "claimed" if result.cves else "mentioned, not claimed (partial update)" if result.partial \
                else "mentioned, not claimed"
            print(f"changelog {result.from_version} -> {result.to_version}: {', '.join(result.cves_mentioned)} "
                  f"({claim})")
        if result.package_path is None:
            print(f"nothing to carry from {result.from_version} to {result.to_version}: no package written")
        else:
            partial = f", partial ({len(result.not_carried)} file(s) not carried)" if result.partial else ""
            print(f"built {result.package_path} for {target.release}: {result.from_version} -> "
                  f"{result.to_version}{partial} in {result.seconds:.1f} s")
    return 0 if result.package_path is not None else 4


# ----- live operations -------------------------------------------------------------------------
def _present(result, as_json: bool) -> int:
    """An apply/revert result: its JSON for scripts, its one-line description for people."""
    if as_json:
        print_json(result.to_json())
    else:
        print(result.describe())
    return 0


def _trust_policy(args: argparse.Namespace):
    from dynamos.kernel.trust import TrustPolicy
    from dynamos.update.signature import trust_store_path

    if args.allow_unsigned:
        print("dynamos: warning: --allow-unsigned: an unsigned package is loaded without knowing who made it "
              "(for development only)", file=sys.stderr)
    return TrustPolicy(trust_store_path(args.trust_store), args.allow_unsigned, args.allow_older)


def cmd_apply(args: argparse.Namespace) -> int:
    from dynamos import kernel

    trust = _trust_policy(args)
    if args.check:
        report = kernel.LiveKernel(trust=trust).check(Path(args.package))
        if args.json:
            print_json(report)
            return 0
        print(f"{report['update']}: would apply to {report['kernel']} ({report['consistency']} consistency); "
              "nothing was loaded")
        print(f"  signed by {_signer_text(report['signer'])}")
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
    progress = ProgressPrinter(args.json or args.quiet)
    return _present(kernel.apply(Path(args.package), timeout=args.timeout, progress=progress,
                                 force=args.force, wait=args.wait, trust=trust), args.json)


def _signer_text(signer: dict | None) -> str:
    if not signer:
        return "-"
    return f"{signer['name']} ({signer['fingerprint'][-16:]})" if signer.get("fingerprint") else signer["name"]


def cmd_blockers(args: argparse.Namespace) -> int:
    from dynamos import kernel

    found = kernel.LiveKernel().transition_blockers(args.name)
    if args.json:
        print_json({name: [b.to_json() for b in blockers] for name, blockers in found.items()})
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

    return _present(kernel.revert(args.name, timeout=args.timeout, progress=ProgressPrinter(args.json or args.quiet),
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
    if args.uname:
        if args.json:
            print_json({"effective_kernel": data["effective_kernel"], "cves": data["cves"]})
        else:
            print(data["effective_kernel"])
        return 0
    if args.json:
        print_json(data)
        return 0
    print(f"kernel {data['kernel']}, livepatch {'available' if data['livepatch'] else 'NOT available'}")
    fixes = f", fixes {', '.join(data['cves'])}" if data["cves"] else ""
    print(f"effective kernel {data['effective_kernel']}{fixes}")
    if data.get("effective_version"):
        print(f"effective version {data['effective_version']}")
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
        by = _signer_text(u.get("signer")) if u.get("dynamos") else "other (not dynamos)"
        rows.append([u["name"], by, state, funcs])
    print(table(rows, ["UPDATE", "SIGNED BY", "STATE", "FUNCTIONS"]))
    for u in data["updates"]:
        for f in u.get("editions", []):
            print(f"\n{u['name']} {f['function']}: route {'; '.join(f['route'])}")
            print(table([[e["index"], e["name"], e["calls"], e["in_flight"], "live" if e["live"] else "retired"]
                          for e in f["editions"]], ["EDITION", "NAME", "CALLS", "IN-FLIGHT", "STATE"]))
            if "thread" in f:
                t = f["thread"]
                print(f"kernel thread: pid {t.get('pid')} on the {t.get('on')} code, {t.get('restarts')} restart(s), "
                      f"last took {t.get('last_restart_ns', 0) / 1000:.0f} us")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dynamos.update.package import read_package
    from dynamos.update.signature import SignatureRefused, trust_store_path, verify_signature

    pkg = read_package(Path(args.package))
    store = trust_store_path(args.trust_store)
    try:
        signer = verify_signature(pkg.manifest_bytes, pkg.signature, pkg.manifest, store=store, path=pkg.path)
        trust = {"trusted": True, "signer": signer.to_json()}
    except SignatureRefused as e:
        trust = {"trusted": False, "code": e.code, "reason": e.message, "signer_claim": pkg.signer_claim}
    data = {"update": pkg.name, "livepatch_name": pkg.livepatch_name, "description": pkg.description,
            "version": pkg.version, "cves": list(pkg.cves), "kernel": pkg.kernel_release,
            "consistency": pkg.consistency, "replace": pkg.replace, "created": pkg.manifest["created"],
            "module_sha256": pkg.module_sha256, "trust_store": str(store), **trust,
            **({"debian": pkg.debian} if pkg.debian else {}), "functions": pkg.functions}
    if args.json:
        print_json(data)
        return 0
    print(f"{pkg.name} {pkg.version or ''}".rstrip() + f": {pkg.description}")
    print(f"  for kernel {pkg.kernel_release}; built {data['created']}; {pkg.consistency} consistency"
          + ("; replaces earlier updates" if pkg.replace else ""))
    if pkg.cves:
        print(f"  fixes {', '.join(pkg.cves)}")
    if pkg.debian:
        deb = pkg.debian
        missing = f"; PARTIAL, not carried: {', '.join(deb['not_carried'])}" if deb["partial"] else ""
        print(f"  Debian {deb['package']} {deb['from']} -> {deb['to']}{missing}")
        if deb["partial"] and deb["cves_mentioned"]:
            print(f"  changelog mentions {', '.join(deb['cves_mentioned'])} (not claimed: partial)")
    if trust["trusted"]:
        print(f"  signed by {_signer_text(trust['signer'])}: trusted by {store}")
    else:
        print(f"  NOT trusted by {store}: {trust['reason']}")
    print(f"  module sha256 {pkg.module_sha256}")
    for f in pkg.patched_functions:
        where = "" if f.object == "vmlinux" else f" [{f.object}]"
        print(f"  replaces {f.name}{where}")
    return 0


# ----- editions --------------------------------------------------------------------------------
def cmd_switch(args: argparse.Namespace) -> int:
    from dynamos.kernel.editions import Selector, switch

    selector = Selector(pids=args.pids, cgroup=args.cgroup, cpus=args.cpus, share=args.share)
    installer = None
    if args.persist:  # refused before switching when there is no installed package to keep it with
        from dynamos.kernel import Installer, LiveKernel

        installer = Installer(LiveKernel(lock_wait=args.wait))
        installer.installed_for_running(args.update)
    control = switch(args.update, args.function, args.edition, selector, reset=args.reset, wait=args.wait)
    data = control.to_json()
    if installer is not None:
        kept, dropped = installer.persist_route(args.update, control.function,
                                                None if args.reset else control.route())
        data["persisted"] = {"route": kept, "dropped": dropped, "reset": bool(args.reset)}
    if args.json:
        print_json(data)
        return 0
    print(f"{control.update} {control.function}: route {'; '.join(control.route())}")
    if installer is not None:
        print("  stored for boot: " + ("the update's own route" if args.reset else "; ".join(kept))
              + (f" (not stored, ids do not survive a reboot: {'; '.join(dropped)})" if dropped else ""))
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    from dynamos.kernel.editions import RetireTimeout, retire

    try:
        result = retire(args.update, args.function, args.edition, timeout=args.timeout,
                        progress=ProgressPrinter(args.json or args.quiet), wait=args.wait)
    except RetireTimeout as e:  # with --json the failure object carries the same (errors.details)
        for holder in e.result.holders:
            print(f"  {holder['comm']} (pid {holder['pid']}, tid {holder['tid']}):", file=sys.stderr)
            for frame in holder["stack"]:
                print(f"    {frame}", file=sys.stderr)
        raise
    if args.json:
        print_json(result.to_json())
    else:
        print(f"{result.update} {result.function}: edition {result.edition} ({result.name}) retired; "
              f"no call left in it after {result.seconds:.2f} s")
    return 0


def _monitor_show(args: argparse.Namespace, monitor_rows) -> int:
    """Refresh until Ctrl-C: on a terminal the screen is redrawn; into a pipe each interval is
    appended with no escapes; with --json one object per interval (one line each)."""
    from dynamos.cli import monitorview as view

    before, last = None, time.monotonic()
    redraw = sys.stdout.isatty()
    while True:
        rows = monitor_rows(update=args.update)
        now = time.monotonic()
        call_rates = view.rates(rows, before, now - last)
        before, last = view.counts(rows), now
        if args.json:
            data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "functions": [{**r.to_json(), "calls_per_s": None if rate == "-" else float(rate[:-2])}
                                  for r, rate in zip(rows, call_rates, strict=True)]}
            if args.once:
                print_json(data)
                return 0
            print(json.dumps(data), flush=True)
        else:
            text = (view.monitor_table(rows, call_rates) + "\n\n" + view.histograms(rows)).rstrip() if rows else \
                "no monitored functions (start with: dynamos monitor FUNCTION)"
            if args.once:
                print(text)
                return 0
            head = time.strftime("%H:%M:%S ") + "dynamos monitor (Ctrl-C to stop)"
            print(("\x1b[H\x1b[2J" if redraw else "\n") + head + "\n" + text, flush=True)
        time.sleep(args.interval)


def cmd_monitor(args: argparse.Namespace) -> int:
    from dynamos.monitor import build_monitor, monitor_rows

    if args.show:
        if args.functions:
            raise DynamosError("monitor --show takes no function names (it shows every monitored function)")
        return _monitor_show(args, monitor_rows)
    if not args.functions:
        raise DynamosError("monitor: name the kernel functions to watch, or use --show")
    from dynamos import kernel
    from dynamos.target import resolve_target

    progress = ProgressPrinter(args.json or args.quiet)
    target = resolve_target(args.kernel, progress)
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="dynamos-monitor-"))
    built = build_monitor(args.functions, target, output, name=args.name, progress=progress)
    if args.build_only:
        print(built.package_path)
        return 0
    result = kernel.apply(built.package_path, timeout=args.timeout, progress=progress)
    if args.json:
        print_json(result.to_json())
    else:
        print(result.describe())
        print("watch with: dynamos monitor --show; remove with: dynamos revert " + result.name)
    return 0


# ----- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from dynamos.demo import run_demo
    from dynamos.target import DEFAULT_LAB_KERNEL

    progress = ProgressPrinter(args.json or args.quiet)
    report = run_demo(kernel=args.kernel or DEFAULT_LAB_KERNEL, progress=progress,
                      say=None if args.json else print)
    if args.json:
        print_json(report.to_json())
    return 0 if report.ok else 1


