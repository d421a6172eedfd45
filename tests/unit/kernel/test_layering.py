"""The runtime commands' code stands alone: what a production host installs imports no build tooling.

apply, revert, status, switch and retire run as root on the target; they must not drag in the
builder, the target-kernel tooling, the lab or pyelftools (which such a host need not have).
Checked in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

RUNTIME_MODULES = ("dynamos.kernel", "dynamos.kernel.editions", "dynamos.update.package")
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
