"""The lab demo: a live update built from ``examples/``, applied and reverted on the real kernel.

Everything runs through the same library and CLI a production host uses: the package is built
on the host against the lab kernel's headers, then ``dynamos apply``/``status``/``revert`` run
inside the guest against the guest's kernel.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.errors import DynamosError
from dynamos.lab import Lab, LabConfig, lab_session
from dynamos.lab.machine import default_shares
from dynamos.lab.vm import choose_accel
from dynamos.target import DEFAULT_LAB_KERNEL, cache_root, fetch_target

DEMO_EXAMPLE = "cmdline-banner"
DEMO_FILE = "/proc/cmdline"


def examples_dir() -> Path:
    """``examples/`` of the source tree dynamos runs from, else of the working directory."""
    here = Path(__file__).resolve().parents[2] / "examples"
    return here if here.is_dir() else Path.cwd() / "examples"


@dataclass
class Step:
    what: str
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class DemoReport:
    kernel: str
    steps: list[Step] = field(default_factory=list)
    before: str = ""
    during: str = ""
    after: str = ""

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "ok": self.ok, "file": DEMO_FILE,
                "before": self.before, "during": self.during, "after": self.after,
                "steps": [s.__dict__ for s in self.steps]}


def guest_dynamos(*args: str) -> list[str]:
    """The command line that runs this very dynamos inside the guest (same interpreter path)."""
    return [sys.executable, "-m", "dynamos", *args]


def guest_env() -> dict[str, str]:
    """Environment that makes this dynamos importable in the guest even when it is not installed
    (run from a source tree): the host root is shared, so the same path works there."""
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run_demo(kernel: str = DEFAULT_LAB_KERNEL, progress: Callable[[str], None] | None = None,
             say: Callable[[str], None] | None = None) -> DemoReport:
    from dynamos.builder.kbuild import build_update

    progress = progress or (lambda _m: None)
    say = say or (lambda _m: None)
    report = DemoReport(kernel)

    def step(what: str, fn: Callable[[], str], check: Callable[[str], bool] = lambda _o: True) -> str:
        t0 = time.monotonic()
        progress(what)
        try:
            out = fn()
            ok = check(out)
            detail = "" if ok else "unexpected result"
        except DynamosError as e:
            out, ok, detail = "", False, str(e)
        report.steps.append(Step(what, round(time.monotonic() - t0, 3), ok, detail))
        if not ok:
            raise _DemoFailed(detail)
        return out

    try:
        target = fetch_target(kernel, progress)
        packages = cache_root() / "packages"
        packages.mkdir(parents=True, exist_ok=True)
        source = examples_dir() / DEMO_EXAMPLE
        built = {}

        def build() -> str:
            built["result"] = build_update(source, target, output=packages, progress=progress)
            return str(built["result"].package_path)

        package = step(f"build {source.name} against {kernel} headers", build)
        accel = step("choose accelerator (KVM only if a probe boot proves it)", lambda: choose_accel(target, progress))
        config = LabConfig(kernel=kernel, shares=default_shares(), accel=accel)
        t0 = time.monotonic()
        with lab_session(config, progress=progress) as lab:
            report.steps.append(Step(f"boot lab ({lab.info['accel']})", round(time.monotonic() - t0, 3), True))
            report.before = step(f"read {DEMO_FILE} before", lambda: _guest(lab, ["cat", DEMO_FILE]))
            say(f"\n{DEMO_FILE} before the update:\n  {report.before.strip()}\n")
            step(f"apply {Path(package).name} in the guest",
                 lambda: _guest(lab, guest_dynamos("apply", package, "--json")),
                 lambda out: json.loads(out).get("name") is not None)
            report.during = step(f"read {DEMO_FILE} with the update live", lambda: _guest(lab, ["cat", DEMO_FILE]),
                                 lambda out: out != report.before)
            say(f"{DEMO_FILE} with the live update:\n  {report.during.strip()}\n")
            status = step("dynamos status", lambda: _guest(lab, guest_dynamos("status")))
            say(status.rstrip() + "\n")
            step(f"revert {DEMO_EXAMPLE}", lambda: _guest(lab, guest_dynamos("revert", DEMO_EXAMPLE, "--json")))
            report.after = step(f"read {DEMO_FILE} after revert", lambda: _guest(lab, ["cat", DEMO_FILE]),
                                lambda out: out == report.before)
            say(f"{DEMO_FILE} after revert:\n  {report.after.strip()}\n")
            step("module gone, no live update left",
                 lambda: _guest(lab, ["sh", "-c", "ls /sys/kernel/livepatch; grep -c cmdline_banner /proc/modules"
                                      " || true"]),
                 lambda out: out.split() == ["0"])
    except _DemoFailed:
        pass
    except DynamosError as e:
        report.steps.append(Step("lab", 0.0, False, str(e)))
    say("step                                              seconds  result")
    for s in report.steps:
        say(f"{s.what:<50}{s.seconds:>8.2f}  {'ok' if s.ok else 'FAILED: ' + s.detail}")
    say("\nlive update applied and reverted on the running kernel, no reboot" if report.ok else "\ndemo FAILED")
    return report


class _DemoFailed(Exception):
    pass


def _guest(lab: Lab, argv: list[str]) -> str:
    r = lab.run(argv, timeout=120, env=guest_env())
    if r.oopsed:
        raise DynamosError("guest kernel trouble: " + "; ".join(r.kernel_messages[:5]))
    if r.status != 0:
        raise DynamosError(f"{' '.join(argv)} exited {r.status}: {(r.stderr or r.stdout).decode(errors='replace')}")
    return r.stdout.decode(errors="replace")
