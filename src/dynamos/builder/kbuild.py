"""Kbuild invocation: build an update source into a livepatch module for a target kernel.

The author's files are copied into a private build directory (``<cache>/builds/<name>-<rel>``)
next to the generated glue, and the target's own Kbuild tree compiles them. Compiler messages
point at the copies, so they are rewritten to the author's original paths before being shown.
"""

from __future__ import annotations

import fcntl
import io
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from dynamos.builder import dispatch
from dynamos.builder.cgen import generate_kbuild, generate_livepatch_source, thunk_target
from dynamos.builder.klp import KlpSymbol, convert_to_klp, exported_symbols, klp_symbols_needed
from dynamos.builder.namecheck import check_names
from dynamos.builder.signing import Signer, configured_signer
from dynamos.errors import BuildError
from dynamos.target import TargetKernel, cache_root
from dynamos.target.make import MAKE_JOBS, error_lines, make_env, stream_make
from dynamos.update.model import UpdateSource
from dynamos.update.package import package_filename, write_package
from dynamos.update.validate import load_update_source

# Author files go in a subdirectory so no name of theirs can clash with the module or the glue.
AUTHOR_SUBDIR = "src"
BUILD_LOG = "build.log"
REQUIRED_TOOLS = ("make", "gcc", "ld")

_FILE_STEM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_+.-]*$")

# Kbuild's quiet output: "  CC [M]  /path/x.o", "  LD [M]  /path/x.ko", "  MODPOST /path/...".
_KBUILD_STEP_RE = re.compile(r"^\s+(CC|LD|MODPOST)(?: \[M\])?\s+(\S+)")
_UNDEFINED_RE = re.compile(r'^ERROR: modpost: "([^"]+)" \[[^\]]*\] undefined!')


@dataclass(frozen=True)
class BuildResult:
    """A livepatch module built for one target kernel, and how it was built."""

    module_path: Path  # the .ko in the build directory
    module: bytes
    vermagic: str
    build_log: str
    build_dir: Path
    seconds: float
    package_path: Path | None = None  # the update package, when one was asked for


def build_dir_for(source: UpdateSource, target: TargetKernel) -> Path:
    """Build directory of an update for a target: one per (update, release), reused and cleaned."""
    return cache_root() / "builds" / f"{source.livepatch_name}-{target.release}"


def main_object_name(source: UpdateSource) -> str:
    """Object holding the generated glue; never the module's own name (Kbuild forbids that)."""
    return f"{source.livepatch_name}_main.o"


def read_modinfo(module: bytes, where: Path | str = "<module>") -> dict[str, str]:
    """The ``key=value`` entries of a module's ``.modinfo`` section (last one wins per key)."""
    try:
        elf = ELFFile(io.BytesIO(module))
        section = elf.get_section_by_name(".modinfo")
    except ELFError as e:
        raise BuildError(f"not an ELF kernel module: {e}", path=where) from e
    if section is None:
        raise BuildError("module has no .modinfo section", path=where)
    info: dict[str, str] = {}
    for entry in section.data().split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info[key] = value
    return info


def rewrite_paths(text: str, build_dir: Path, source_dir: Path) -> str:
    """Point compiler messages at the author's files instead of their copies in the build dir."""
    copies = {str(build_dir.absolute() / AUTHOR_SUBDIR), str(build_dir.resolve() / AUTHOR_SUBDIR)}
    for copy in sorted(copies, key=len, reverse=True):
        text = text.replace(copy + "/", str(source_dir) + "/")
    return text


def _say_nothing(_message: str) -> None:
    pass


def build_update(source_dir: Path | str, target: TargetKernel, output: Path | None = None,
                 progress: Callable[[str], None] | None = None,
                 module_dirs: Sequence[Path] = (), signer: Signer | None = None) -> BuildResult:
    """Build the update source in ``source_dir`` into a livepatch module for ``target``.

    With ``output`` (a file, or a directory to put the package in) also write the update
    package. ``module_dirs`` hold out-of-tree modules the update patches (for their BTF).
    Every failure raises BuildError (UpdateSourceError for an invalid update source).
    """
    started = time.monotonic()
    say = progress or _say_nothing
    source_dir = Path(source_dir)
    source = load_update_source(source_dir)
    _check_release(source, target)
    check_names(source, target, lambda message: say(f"warning: {message}"), module_dirs)
    _check_toolchain(target)
    author_files = _author_files(source)

    build_dir = build_dir_for(source, target).absolute()
    with build_lock(build_dir):
        _prepare_build_dir(build_dir, source, author_files, target, module_dirs)
        linked = link_module(build_dir, source, target, say, thunk_placeholders(source))

    package_path = None
    if output is not None:
        package_path = write_package_of(Path(output), source, target, linked, signer)
        say(f"wrote {package_path}")
    return BuildResult(module_path=linked.module_path, module=linked.module, vermagic=linked.vermagic,
                       build_log=linked.log, build_dir=build_dir, seconds=time.monotonic() - started,
                       package_path=package_path)


@dataclass
class LinkedModule:
    module_path: Path
    module: bytes
    vermagic: str
    log: str
    klp_symbols: list[KlpSymbol]


def link_module(build_dir: Path, source: UpdateSource, target: TargetKernel, say: Callable[[str], None],
                placeholders: Mapping[str, KlpSymbol] | None = None) -> LinkedModule:
    """Run Kbuild in a prepared build dir, then make every symbol the loader cannot resolve a
    livepatch symbol (``placeholders``: names standing for kernel symbols, from the diff builder)."""
    log = _run_make(build_dir, source, target, say)
    module_path = build_dir / f"{source.livepatch_name}.ko"
    if not module_path.is_file():
        raise BuildError(f"make succeeded but produced no {module_path.name}; see {build_dir / BUILD_LOG}")
    module = module_path.read_bytes()
    placeholders = dict(placeholders or {})
    klp_symbols = [s for s in _klp_symbols(module, source, target) if s.name not in placeholders]
    if klp_symbols or placeholders:
        everything = {**{s.name: s for s in klp_symbols}, **placeholders}
        say("resolving at load time through livepatch: "
            + ", ".join(sorted({f"{s.name} ({s.object})" for s in everything.values()})))
        module = convert_to_klp(module, everything)
        module_path.write_bytes(module)
    vermagic = _check_module(module, module_path, target)
    unique = {s.klp_name: s for s in [*klp_symbols, *placeholders.values()]}
    return LinkedModule(module_path, module, vermagic, log, sorted(unique.values(), key=lambda s: s.klp_name))


def _check_release(source: UpdateSource, target: TargetKernel) -> None:
    if source.kernel is None or source.kernel == target.release:
        return
    line = None
    for number, text in enumerate(source.toml_path.read_text().splitlines(), start=1):
        if re.match(r"\s*kernel\s*=", text):
            line = number
            break
    raise BuildError(
        f"update.toml is written for kernel {source.kernel}, but the target kernel is "
        f"{target.release}; build for {source.kernel} or change update.kernel",
        path=source.toml_path, line=line)


def _check_toolchain(target: TargetKernel) -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise BuildError(f"building a module needs {' and '.join(missing)}, which {verb} not installed "
                         f"(on Debian: apt-get install build-essential)")
    if not (target.headers_dir / "Makefile").is_file():
        raise BuildError(
            f"no kernel headers for {target.release} at {target.headers_dir}: install "
            f"linux-headers-{target.release}, or build for a lab kernel with --kernel {target.release} "
            f"(dynamos fetches its headers into the cache)")


def _author_files(source: UpdateSource) -> list[Path]:
    """The author's C files (each becomes an object) and headers, relative to the source dir."""
    for c_file in source.c_files:
        if not _FILE_STEM_RE.match(c_file.stem):
            raise BuildError("C file name cannot be used in a Kbuild object list "
                             "(use letters, digits, '_', '-', '.')", path=c_file)
    if not source.c_files and any(f.author_functions for f in source.functions):
        raise BuildError("the update source has no .c file holding the editions", path=source.directory)
    headers = [h for h in source.directory.rglob("*.h")
               if not any(part.startswith(".") for part in h.relative_to(source.directory).parts)]
    return [p.relative_to(source.directory) for p in (*source.c_files, *sorted(headers))]


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds of the same update for the same kernel: they share a directory."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def thunk_placeholders(source: UpdateSource) -> dict[str, KlpSymbol]:
    """Kernel functions that multi-edition dispatchers enter (edition 0), by placeholder name."""
    targets = [thunk_target(f) for f in source.functions if f.dispatched]
    return {t.placeholder: t for t in targets}


def _prepare_build_dir(build_dir: Path, source: UpdateSource, author_files: list[Path],
                       target: TargetKernel, module_dirs: Sequence[Path] = ()) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)
    author_dir = build_dir / AUTHOR_SUBDIR
    author_dir.mkdir(parents=True)
    for rel in author_files:
        dest = author_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.directory / rel, dest)
    main_object = main_object_name(source)

    files: dict[str, str] = {}
    extra_objects: list[str] = []
    if any(f.dispatched for f in source.functions):
        main_c = generate_livepatch_source(source, dispatch.dispatcher_prototypes(source, target, module_dirs),
                                           dispatch.ftrace_site(target))
        files.update(dispatch.runtime_files())
        extra_objects.append(dispatch.RUNTIME_OBJECT)
    else:
        main_c = generate_livepatch_source(source)
    uses_shadow = any(dispatch.SHADOW_HEADER in (author_dir / rel).read_text(errors="replace")
                      for rel in author_files if rel.suffix in (".c", ".h"))
    files.update(dispatch.shadow_files(uses_shadow))
    if uses_shadow:
        extra_objects.append(dispatch.SHADOW_OBJECT)
    for name, text in files.items():
        (build_dir / name).write_text(text)
    (build_dir / main_object).with_suffix(".c").write_text(main_c)
    author_objects = [f"{AUTHOR_SUBDIR}/{c.stem}.o" for c in source.c_files]
    (build_dir / "Kbuild").write_text(generate_kbuild(source, main_object, [*extra_objects, *author_objects]))


def _describe_step(kind: str, path: str, build_dir: Path) -> str:
    p = Path(path)
    try:
        rel = p.relative_to(build_dir)
    except ValueError:
        rel = Path(p.name)
    if rel.parts and rel.parts[0] == AUTHOR_SUBDIR:
        rel = rel.relative_to(AUTHOR_SUBDIR)
    if kind == "CC":
        return f"compiling {rel.with_suffix('.c')}"
    if kind == "LD":
        return f"linking {rel}"
    return "resolving symbols (modpost)"


def _run_make(build_dir: Path, source: UpdateSource, target: TargetKernel,
              say: Callable[[str], None]) -> str:
    cmd = ["make", "-C", str(target.headers_dir), f"M={build_dir}", f"-j{MAKE_JOBS}", "modules"]

    def step(line: str) -> None:
        m = _KBUILD_STEP_RE.match(line)
        if m:
            say(_describe_step(m.group(1), m.group(2), build_dir))

    # Symbols the kernel does not export are not an error here: they become livepatch
    # relocations after the link (see dynamos.builder.klp).
    status, log = stream_make(cmd, make_env({"KBUILD_MODPOST_WARN": "1"}), step)
    log_path = build_dir / BUILD_LOG
    log_path.write_text(log)
    if status != 0:
        raise BuildError(_failure_message(log, source, target, build_dir, log_path))
    return log


def _failure_message(log: str, source: UpdateSource, target: TargetKernel, build_dir: Path,
                     log_path: Path) -> str:
    errors = error_lines(log) or [line for line in log.splitlines() if line.strip()][-15:]
    hints = []
    editions = {f.edition for f in source.functions}
    for line in errors:
        undefined = _UNDEFINED_RE.match(line)
        if undefined and undefined.group(1) in editions:
            hints.append(f"hint: edition {undefined.group(1)} must be defined, and not static, "
                         f"in a C file of the update source")
        elif undefined:
            hints.append(f"hint: {undefined.group(1)} is neither defined in the update source nor "
                         f"exported by kernel {target.release}")
    body = rewrite_paths("\n".join([*errors, *hints]), build_dir, source.directory)
    return (f"building update {source.name} for kernel {target.release} failed:\n{body}\n"
            f"full build log: {log_path}")


def _check_module(module: bytes, module_path: Path, target: TargetKernel) -> str:
    """The module's vermagic, after checking the module really is a livepatch for the target."""
    info = read_modinfo(module, module_path)
    vermagic = info.get("vermagic", "")
    if vermagic.split(" ", 1)[0] != target.release:
        raise BuildError(f"module vermagic {vermagic!r} does not match the target kernel "
                         f"{target.release} (headers at {target.headers_dir})", path=module_path)
    if info.get("livepatch") != "Y":
        raise BuildError("module is not marked livepatch=Y", path=module_path)
    return vermagic


def write_package_of(output: Path, source: UpdateSource, target: TargetKernel, linked: LinkedModule,
                     signer: Signer | None = None) -> Path:
    """The signed update package of a linked module: into ``output`` (a file, or a directory to
    name it in). Signed by ``signer``, else the configured one (see ``configured_signer``): the
    module first, as the last change to its bytes, then the manifest that holds its digest."""
    signer = signer or configured_signer(None, cache_root())
    path = output / package_filename(source.name, target.release) if output.is_dir() else output
    return write_package(path, source=source, kernel_release=target.release, vermagic=linked.vermagic,
                         module=signer.sign_module(linked.module), build_log=linked.log,
                         klp_symbols=[s.to_json() for s in linked.klp_symbols],
                         signer=signer.manifest_signer(), sign=signer.sign_manifest)


def _klp_symbols(module: bytes, source: UpdateSource, target: TargetKernel) -> list[KlpSymbol]:
    """Undefined symbols no export satisfies: editions may use them (declared ``extern``), and
    livepatch resolves them when the update loads."""
    symvers = target.headers_dir / "Module.symvers"
    if not symvers.is_file():
        raise BuildError(f"no Module.symvers in {target.headers_dir}: cannot tell exported symbols")
    declared = {s.name: KlpSymbol(s.name, s.object, s.sympos or 0) for s in source.symbols}
    return klp_symbols_needed(module, exported_symbols(symvers), declared)
