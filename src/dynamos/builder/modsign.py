"""Writing the kernel's module signature: what ``scripts/sign-file`` does, with openssl's CLI.

The signature is a detached CMS (PKCS#7) over the module's ELF bytes, with no signed attributes
and no certificates (the kernel finds the key by issuer and serial), appended with the trailer
``update/modsig.py`` reads. Applied last, after every ELF rewrite: any later edit breaks it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dynamos.errors import BuildError
from dynamos.update.modsig import read_module_signature, trailer

_PACKAGE_OF_TOOL = {"gpg": "gnupg", "gpgconf": "gnupg"}


def run_tool(argv: Sequence[str], what: str, *, stdin: bytes | None = None) -> bytes:
    """Run a signing tool; BuildError with its last words when it is missing or fails."""
    tool = argv[0]
    if shutil.which(tool) is None:
        raise BuildError(f"{what}: {tool} not found (install the {_PACKAGE_OF_TOOL.get(tool, tool)} package)")
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise BuildError(f"{what} failed ({tool} exit {proc.returncode}): {' / '.join(detail)}")
    return proc.stdout


def sign_module(module: bytes, key: Path, cert: Path) -> bytes:
    """``module`` signed with ``key`` (its certificate ``cert``), replacing any signature it had."""
    elf = module[:sig.elf_size] if (sig := read_module_signature(module)) else module
    with tempfile.TemporaryDirectory(prefix="dynamos-modsign-") as tmp:
        path = Path(tmp) / "module.ko"
        path.write_bytes(elf)
        der = run_tool(["openssl", "cms", "-sign", "-binary", "-noattr", "-nocerts", "-nosmimecap",
                        "-md", "sha256", "-outform", "DER", "-signer", str(cert), "-inkey", str(key),
                        "-in", str(path)], "signing the module")
    return elf + trailer(der)
