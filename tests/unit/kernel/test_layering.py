"""The runtime commands' code stands alone: what a production host installs imports no build tooling.

apply, revert, status, switch, retire, install, uninstall, load --all and gc run as root on the
target; they must not drag in the builder, the target-kernel tooling, the lab or pyelftools (which
such a host need not have: the ``dynamos`` Debian package ships without them). Checked in a fresh
interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

RUNTIME_MODULES = ("dynamos.kernel", "dynamos.kernel.editions", "dynamos.kernel.installed", "dynamos.update.package",
                   "dynamos.cli", "dynamos.cli.persist")
FORBIDDEN = ("dynamos.builder", "dynamos.target", "dynamos.lab", "elftools")


def test_runtime_commands_import_no_build_tooling() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import dynamos.kernel\n"
        f"for name in {RUNTIME_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "for info in pkgutil.iter_modules(dynamos.kernel.__path__, 'dynamos.kernel.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "dynamos.kernel.live" in loaded and "dynamos.update.package" in loaded
    offending = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert offending == []


def test_runtime_cli_commands_import_no_build_tooling(tmp_path) -> None:
    """The command line itself, run the way a host runs it, for each runtime verb: parsing the
    command and running it (as if by a non-root user, so each stops before touching this host)
    pulls in none of the build tooling."""
    verbs = [["status"], ["install", "--help"], ["uninstall", "x", "--json"], ["load", "--all", "--json"],
             ["gc", "--json"], ["installed", "--json"], ["switch", "x", "f", "1", "--persist", "--json"]]
    code = (
        "import json, os, sys, contextlib, io\n"
        "os.geteuid = lambda: 1000\n"
        "import dynamos.cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        "        dynamos.cli.main(json.loads(sys.argv[1]))\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "DYNAMOS_LOG": str(tmp_path / "actions.log"),
           "DYNAMOS_TRUST_STORE": str(tmp_path / "trusted")}
    for verb in verbs:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(verb)], capture_output=True, text=True,
                             check=True, env=env).stdout
        loaded = json.loads(out.splitlines()[-1])
        offending = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
        assert offending == [], verb
