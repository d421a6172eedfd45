"""The one way unit tests compile small C files like the kernel does (no kernel tree needed).

The flags are those of Debian's 6.1 x86-64 build that shape an object: fentry call sites with
an mcount table, the kernel code model, return thunks, no red zone, no jump tables; sections per
function and per data object are the builder's own flags and are on unless a test needs the
kernel's one-``.text`` layout.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

KERNEL_CFLAGS = (
    "-O2", "-pg", "-mfentry", "-mrecord-mcount", "-fno-pic", "-mcmodel=kernel", "-mno-red-zone",
    "-fno-asynchronous-unwind-tables", "-mindirect-branch=thunk-extern", "-mfunction-return=thunk-extern",
    "-mindirect-branch-register", "-fno-jump-tables", "-fno-strict-aliasing", "-fno-common",
    "-fno-stack-protector", "-fcf-protection=none", "-nostdinc", "-w",
)
SECTION_FLAGS = ("-ffunction-sections", "-fdata-sections")


def compile_kernel_like(directory: Path, name: str, text: str, *, sections: bool = True) -> Path:
    """``text`` compiled as ``directory/<name>.c``; returns the object's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.c").write_text(text)
    flags = [*KERNEL_CFLAGS, *(SECTION_FLAGS if sections else ())]
    subprocess.run(["gcc", *flags, "-c", f"{name}.c", "-o", f"{name}.o"], cwd=directory, check=True,
                   capture_output=True, text=True)
    return directory / f"{name}.o"
