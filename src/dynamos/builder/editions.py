"""Build support for multi-edition functions: prototypes from BTF, the runtime's C, ftrace sites.

A dispatcher must forward every argument and the return value exactly, so its prototype is
read from the target kernel's own BTF, never from the author's C or a guess. The runtime C
(``dynamos/runtime``) is compiled into each update module that has a dispatcher.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from dynamos.abi import VMLINUX
from dynamos.builder.btf import BtfTypes, Prototype
from dynamos.builder.cgen import RUNTIME_HEADER
from dynamos.errors import BuildError
from dynamos.target import TargetKernel
from dynamos.target.images import extract_vmlinux
from dynamos.target.source import read_config
from dynamos.update.model import FunctionSpec, UpdateSource

RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
RUNTIME_SOURCE = "dynamos_editions.c"
# Inside the build dir the runtime is compiled as this object, apart from the author's files.
RUNTIME_OBJECT = "dynamos_runtime.o"
RUNNING_BTF = Path("/sys/kernel/btf/vmlinux")
SHADOW_HEADER = "dynamos_shadow.h"  # shadow-data helpers any update's C may include
SHADOW_OBJECT = "dynamos_shadow_data.o"


def runtime_files() -> dict[str, str]:
    """Build-dir file name -> text of the edition runtime shipped in every dispatching module."""
    return {
        RUNTIME_HEADER: (RUNTIME_DIR / RUNTIME_HEADER).read_text(),
        RUNTIME_OBJECT.replace(".o", ".c"): (RUNTIME_DIR / RUNTIME_SOURCE).read_text(),
    }


def shadow_files(used: bool) -> dict[str, str]:
    """Build-dir file name -> text of the shadow-data helpers: the header always (any update may
    include it), their object only when the update's C uses them."""
    files = {SHADOW_HEADER: (RUNTIME_DIR / SHADOW_HEADER).read_text()}
    if used:
        files[SHADOW_OBJECT.replace(".o", ".c")] = (RUNTIME_DIR / "dynamos_shadow.c").read_text()
    return files


def ftrace_site(target: TargetKernel) -> int:
    """Offset of the ftrace call in a function: after the 4-byte ENDBR when the kernel uses IBT."""
    config = target.config if target.config and target.config.is_file() else target.headers_dir / ".config"
    if not config.is_file():
        raise BuildError(f"no kernel config for {target.release} (looked at {config}): cannot tell where "
                         "a function's ftrace site is")
    return 4 if read_config(config).get("CONFIG_X86_KERNEL_IBT") == "y" else 0


@functools.lru_cache(maxsize=8)
def _btf_of(path: Path, base_path: Path | None) -> BtfTypes:
    base = _btf_of(base_path, None) if base_path else None
    if path == RUNNING_BTF:
        return BtfTypes.from_bytes(path.read_bytes())
    return BtfTypes.from_elf(path, base=base)


def _vmlinux_btf_path(target: TargetKernel) -> Path:
    if target.image is not None:
        return extract_vmlinux(target)
    if os.uname().release == target.release and RUNNING_BTF.is_file():
        return RUNNING_BTF
    raise BuildError(f"no BTF for kernel {target.release}: multi-edition functions need the kernel's "
                     "type information (build with --kernel to use a fetched kernel image)")


def _module_file(obj: str, target: TargetKernel, module_dirs: Sequence[Path]) -> Path:
    """A module's file: first in ``module_dirs`` (out-of-tree modules), then the target's tree."""
    for directory in module_dirs:
        for name in dict.fromkeys((obj, obj.replace("_", "-"))):
            for suffix in (".ko", ".ko.xz", ".ko.gz"):
                if (Path(directory) / (name + suffix)).is_file():
                    return Path(directory) / (name + suffix)
    return target.module_path(obj)


def prototype_of(f: FunctionSpec, target: TargetKernel, module_dirs: Sequence[Path] = ()) -> Prototype:
    """The kernel function's prototype, from vmlinux BTF or its module's split BTF."""
    vmlinux = _vmlinux_btf_path(target)
    if f.object == VMLINUX:
        return _btf_of(vmlinux, None).prototype(f.name)
    try:
        module = _module_file(f.object, target, module_dirs)
    except Exception as e:
        raise BuildError(f"cannot read the prototype of {f.object} function {f.name}: {e} (an out-of-tree "
                         "module's directory can be named with --module-dir)") from e
    return _btf_of(module, vmlinux).prototype(f.name)


def dispatcher_prototypes(source: UpdateSource, target: TargetKernel,
                          module_dirs: Sequence[Path] = ()) -> dict[FunctionSpec, Prototype]:
    """Prototypes of every function the update serves through a dispatcher."""
    out: dict[FunctionSpec, Prototype] = {}
    for f in source.functions:
        if f.dispatched:
            try:
                out[f] = prototype_of(f, target, module_dirs)
            except BuildError as e:
                raise BuildError(f"{e.message}: the dispatcher of {f.name} needs its exact prototype, which "
                                 "dynamos takes only from the kernel's BTF (pahole leaves out a few functions, "
                                 "e.g. argument-less SYSCALL_DEFINE0 wrappers)", path=source.toml_path,
                                 line=f.line) from e
            if out[f].variadic:
                raise BuildError(f"{f.name} takes variable arguments (...): a dispatcher cannot forward them",
                                 path=source.toml_path, line=f.line)
            if f.kthread and not _is_thread_function(out[f]):
                raise BuildError(f"[[kthread]] {f.name} is declared {out[f].declaration(f.name)} in the kernel, "
                                 "not int (void *): it is not a kernel thread's main function",
                                 path=source.toml_path, line=f.kthread.line)
    return out


def _is_thread_function(proto: Prototype) -> bool:
    """Whether ``proto`` is what kthread_run() takes: int (void *), any pointer argument."""
    return proto.return_type == "int" and len(proto.params) == 1 and not proto.variadic \
        and proto.params[0].decl.removesuffix(proto.params[0].name).rstrip().endswith("*")
