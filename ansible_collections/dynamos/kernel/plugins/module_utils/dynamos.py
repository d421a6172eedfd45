# GPL-2.0-only
"""What the dynamos modules share: running the ``dynamos`` command on the host with ``--json``
(it prints one JSON object, also when it fails) and choosing a host's package by kernel release."""

from __future__ import annotations

import json
import os
import re
import shlex

# A package's file name as ``dynamos build`` writes it: ``<update>_<release>.dynpkg``.
PACKAGE_NAME = re.compile(r"^(?P<update>[^_/]+)_(?P<release>[^/]+)\.dynpkg$")


class PackageChoiceError(ValueError):
    """No package (or more than one) fits a host's kernel release."""


def package_release(path: str) -> str | None:
    """The kernel release a package's file name says it is for (None when the name says nothing)."""
    m = PACKAGE_NAME.match(os.path.basename(path))
    return m.group("release") if m else None


def pick_package(packages, release: str) -> str:
    """The one package for ``release`` out of ``packages``: a path (any release: dynamos refuses a
    wrong one itself), a list of paths named ``<update>_<release>.dynpkg``, or a mapping
    ``{release: path}``. Hosts of one fleet may run different releases; each gets its own build."""
    if isinstance(packages, str):
        return packages
    if isinstance(packages, dict):
        if release in packages:
            return str(packages[release])
        known = ", ".join(sorted(packages)) or "none"
        raise PackageChoiceError(f"no package for kernel {release} (packages for: {known})")
    if isinstance(packages, (list, tuple)):
        fits = [str(p) for p in packages if package_release(str(p)) == release]
        if len(fits) == 1:
            return fits[0]
        if not fits:
            known = sorted({package_release(str(p)) or f"? ({p})" for p in packages})
            raise PackageChoiceError(f"no package for kernel {release} (packages for: {', '.join(known) or 'none'})")
        raise PackageChoiceError(f"more than one package for kernel {release}: {', '.join(fits)}")
    raise PackageChoiceError("packages must be a path, a list of paths or a mapping release: path, "
                             f"not {type(packages).__name__}")


def parse_output(stdout: str, stderr: str, rc: int) -> dict:
    """dynamos' JSON object from its output; a command that printed none (crashed, not found)
    becomes an ``ok: false`` object carrying what it said instead."""
    text = stdout.strip()
    start = text.find("{")
    if start >= 0:
        try:
            data = json.loads(text[start:])
            if isinstance(data, dict):
                data.setdefault("exit_status", rc)
                data.setdefault("ok", rc == 0)
                return data
        except ValueError:
            pass
    message = (stderr.strip() or stdout.strip() or f"exit status {rc}").splitlines()[-1]
    return {"ok": False, "exit_status": rc, "error": message.removeprefix("dynamos: ").removeprefix("error: "),
            "refusals": []}


class Dynamos:
    """Runs ``dynamos ARGS --json`` on the host through an AnsibleModule."""

    def __init__(self, module, executable: str = "dynamos"):
        self.module = module
        self.argv = shlex.split(executable)

    def run(self, *args: str) -> dict:
        rc, out, err = self.module.run_command([*self.argv, *args, "--json"], check_rc=False)
        data = parse_output(out, err, rc)
        data["command"] = " ".join(["dynamos", *args, "--json"])
        return data

    def must(self, *args: str, **extra) -> dict:
        """Run; on failure fail the task with dynamos' own message and its JSON."""
        data = self.run(*args)
        if not data.get("ok", True) or data.get("exit_status", 0) != 0:
            self.module.fail_json(msg=f"dynamos {args[0]}: {data.get('error', 'failed')}", dynamos=data, **extra)
        return data

    def status(self) -> dict:
        return self.must("status")


def update_summary(status: dict) -> list[str]:
    """One line per live update, for diff mode: name, state and module digest."""
    lines = []
    for u in status.get("updates", []):
        state = "enabled" if u.get("enabled") else "disabled"
        if u.get("transition"):
            state += ", in transition"
        digest = (u.get("module_sha256") or "")[:16]
        lines.append(f"{u.get('update') or u['name']} ({u['name']}) {state} {digest}".rstrip() + "\n")
    return lines
