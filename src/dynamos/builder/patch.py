"""The source-diff builder: from a kernel source patch to an update package, compiling only the
translation units the patch touches (original and patched), never the whole kernel.

Pipeline: apply the patch to copies of the touched files (GNU patch) -> compile each unit twice
in the prepared source tree (patched text with line numbers kept stable) -> check the original
objects against the target's own text (fidelity) -> diff at function level -> cut the changed
functions out -> link them with generated livepatch glue -> livepatch relocations -> package.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dynamos.abi import VMLINUX, edition_prefix
from dynamos.builder.borrow import compile_borrowing
from dynamos.builder.cgen import generate_kbuild, generate_livepatch_source
from dynamos.builder.compat import Directives, apply_directives, callback_hooks, with_compat_headers
from dynamos.builder.elf.types import refuse_layout_changes
from dynamos.builder.extract import extract_functions
from dynamos.builder.fidelity import check_fidelity
from dynamos.builder.kbuild import BUILD_LOG, build_lock, link_module, write_package_of
from dynamos.builder.klp import KlpSymbol, exporters, import_namespaces
from dynamos.builder.linemap import stabilise_lines
from dynamos.builder.modkeys import KeySite
from dynamos.builder.modsyms import OtherModules
from dynamos.builder.objdiff import DiffResult, align_statics, diff_objects, read_object
from dynamos.builder.refusals import NOT_BUILT, OTHER, Refusal, code_of, first_unaccepted
from dynamos.builder.resolution import SymbolPositions, module_symbols, resolver, stranded, update_additions
from dynamos.builder.signing import Signer
from dynamos.builder.statics import StaticLocals, resolve_static_locals
from dynamos.builder.units import CompiledUnit, compile_original, compile_unit
from dynamos.builder.unitsof import module_of, translation_units_of
from dynamos.errors import BuildError, DynamosError, TargetError, UpdateSourceError
from dynamos.lab.kallsyms import lab_symbol_table
from dynamos.target import TargetKernel, cache_root
from dynamos.target.images import KernelText, kernel_text
from dynamos.target.modimage import module_image
from dynamos.target.source import KernelSource, prepare_source, read_config
from dynamos.target.symtab import SymbolTable
from dynamos.update.validate import compiled_update_source

_NAME_RE = re.compile(r"[^a-z0-9_-]+")

# Paths a live update cannot change, with the reason: one row per kind.
REFUSED_PATHS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\.S$"), "assembly files cannot be live-patched (no fentry site, no function sections)"),
    (re.compile(r"(^|/)vdso/"), "the vDSO is mapped into user space: a livepatch cannot replace it"),
    (re.compile(r"(^|/)include/.*\.h$"), "a header of the kernel's include directories reaches files all over "
                                         "the tree: not supported, patch the .c files (local headers are)"),
    (re.compile(r"(^|/)(Makefile|Kconfig|Kbuild)[^/]*$"), "build-system changes do not change running code"),
]


@dataclass
class UnitReport:
    """What the builder decided for one translation unit."""

    path: str
    diff: DiffResult
    seconds: dict[str, float] = field(default_factory=dict)
    resolved: dict[str, int] = field(default_factory=dict)  # static name -> sympos of this file's copy
    object: str = VMLINUX  # vmlinux, or the loadable module the file is built into
    fidelity: str = ""  # what the compiled original was compared with, and how it went
    touched: list[str] = field(default_factory=list)  # the patched files it compiles (itself, or included)
    statics: StaticLocals = field(default_factory=StaticLocals)  # its file-local variables in the kernel
    directives: Directives = field(default_factory=Directives)  # what its kpatch/klp-build macros asked for
    key_sites: list[KeySite] = field(default_factory=list)  # module keys' sites rewritten (builder/modkeys.py)
    types: str = ""  # what comparing its patched headers' types found (builder/elf/types.py)
    borrowed: list[str] = field(default_factory=list)  # held-back changes its patched compile needed


@dataclass
class PatchBuild:
    name: str
    package_path: Path | None
    units: list[UnitReport]
    klp_symbols: list[KlpSymbol]
    seconds: float
    phases: dict[str, float]
    skipped: list[str] = field(default_factory=list)  # units including a patched header, not built in
    dropped: dict[str, Refusal] = field(default_factory=dict)  # unit -> why it was left out (tolerant builds)
    # Candidate units checked against the compiler's dependency output of their original compile:
    # unit -> the patched files (other than itself) it read, and unit -> those it did not read under
    # the target's config (an #include in an #ifdef of an option the config leaves unset). A unit
    # that read none of them is skipped without compiling its patched side.
    includes: dict[str, list[str]] = field(default_factory=dict)
    not_including: dict[str, list[str]] = field(default_factory=dict)

    def explain(self) -> list[str]:
        """Per function, why it is in the update; per refused change, why it cannot be."""
        lines = [f"{path}: includes a patched file but is not built into the target: skipped" for path in self.skipped]
        lines += [f"{path}: does not include {', '.join(files)} under the target's config (the compiler's "
                  f"dependency output)" + ("" if path in self.includes else ": skipped")
                  for path, files in self.not_including.items()]
        lines += [f"{path}: LEFT OUT of the update ({why.code}): {why.message}" for path, why in self.dropped.items()]
        for unit in self.units:
            via = [t for t in unit.touched if t != unit.path]
            lines.append(f"{unit.path}:" + (f" (includes {', '.join(via)})" if via else ""))
            lines += [f"  borrowed  {h}: its patched compile needs this change, which the header's other "
                      f"units do not get" for h in unit.borrowed]
            if unit.fidelity:
                lines.append(f"  checked   {unit.fidelity}")
            if unit.types:
                lines.append(f"  checked   {unit.types}")
            for c in unit.diff.changed:
                lines.append(f"  changed   {c.name}: {c.reason}")
            for c in unit.diff.new:
                lines.append(f"  new       {c.name}: {c.reason}")
            for c in unit.diff.new_data:
                lines.append(f"  new data  {c.name}: {c.reason}")
            kept = {c.name for c in unit.diff.changed} | {c.name for c in unit.diff.new}
            for name, sym in unit.statics.found.items():
                if sym.name != name and unit.statics.users.get(name, set()) & kept:
                    lines.append(f"  static    {name} is the kernel's {unit.statics.how[name]}")
            for k in unit.key_sites:
                lines.append(f"  key       {k.function}: {k.key} of module {k.object} ({k.table}): {k.how}")
            for r in unit.diff.refused:
                lines.append(f"  REFUSED   {r.name}: {r.reason}")
            lines += [f"  ignored   {name}: KPATCH_IGNORE_ macro" for name in unit.directives.ignored]
            if unit.diff.unchanged:
                lines.append(f"  unchanged {len(unit.diff.unchanged)} function(s)")
        return lines


# (dropped units with why, skipped units, units not including patched files) -> (update table additions,
# manifest debian table)
Annotate = Callable[[dict[str, Refusal], list[str], dict[str, list[str]]],
                    tuple[dict[str, object], dict[str, object] | None]]

_HUNK_RE = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
# Lines outside hunks from which GNU patch may take a file name: each such name is checked.
_NAME_LINES = (("--- ", 1), ("+++ ", 1), ("*** ", 1), ("Index: ", 1), ("rename from ", 0), ("rename to ", 0),
               ("copy from ", 0), ("copy to ", 0))
MAX_PATCH_SIZE = 64 << 20


def diff_file_names(patch_text: str) -> list[tuple[int, str, int]]:
    """(line number, file name, leading components patch strips) of every header line of a diff.

    Hunk bodies are skipped by their line counts, so a removed line that reads ``-- x`` is code,
    not a file name.
    """
    out: list[tuple[int, str, int]] = []
    old = new = 0
    for number, line in enumerate(patch_text.splitlines(), 1):
        if old > 0 or new > 0:
            if line.startswith("\\"):
                continue
            tag = line[:1]
            old -= tag != "+"
            new -= tag != "-"
            continue
        hunk = _HUNK_RE.match(line)
        if hunk:
            old = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new = int(hunk.group(2)) if hunk.group(2) is not None else 1
            continue
        if line.startswith("diff --git "):
            out += [(number, word, 1) for word in line[len("diff --git "):].split()]
            continue
        for prefix, strip in _NAME_LINES:
            if line.startswith(prefix):
                out.append((number, line[len(prefix):].split("\t")[0].strip(), strip))
    return out


def diff_path_problem(name: str, strip: int) -> str | None:
    """Why a file name in a diff could lead outside the tree it is applied in, or None."""
    if name == "/dev/null":
        return None
    if name.startswith('"'):
        return "is a quoted name (its escapes could spell any path): not supported"
    if name.startswith("/"):
        return "is an absolute path: a patch names files relative to the source tree"
    parts = name.split("/")
    if ".." in parts:
        return "holds '..': it would leave the source tree"
    if not "/".join(parts[strip:]).strip("/"):
        return "names no file once its first component is stripped (-p1)"
    return None


def touched_files(patch_text: str, patch: Path | None = None) -> list[str]:
    """Files a unified diff changes, relative to the tree root (``-p1`` paths).

    Every file name the diff holds is checked first: an absolute path or a '..' is refused,
    naming the line, before anything is written.
    """
    for number, name, strip in diff_file_names(patch_text):
        problem = diff_path_problem(name, strip)
        if problem:
            raise UpdateSourceError(f"file name {name!r} in the patch {problem}; refused before anything was "
                                    "written", path=patch, line=number)
    files = []
    for line in patch_text.splitlines():
        m = re.match(r"^\+\+\+ (\S+)", line)
        if m and m.group(1) != "/dev/null":
            path = m.group(1).split("/", 1)[1] if "/" in m.group(1) else m.group(1)
            if path not in files:
                files.append(path)
    if not files:
        raise BuildError("the patch changes no file (is it a unified diff?)")
    return files


def read_patch(patch: Path) -> str:
    """A patch file's text: a regular file of bounded size (a FIFO would hang the build)."""
    try:
        info = os.stat(patch)
        if not stat.S_ISREG(info.st_mode):
            raise UpdateSourceError("is not a regular file: give a patch file", path=patch)
        if info.st_size > MAX_PATCH_SIZE:
            raise UpdateSourceError(f"is {info.st_size} bytes; a patch is at most {MAX_PATCH_SIZE}", path=patch)
        with open(patch, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            return f.read(MAX_PATCH_SIZE).decode("utf-8", errors="replace")
    except OSError as e:
        raise UpdateSourceError(f"cannot read the patch: {e.strerror or e}", path=patch) from e


def patched_texts(patch: Path, tree: Path, files: list[str]) -> dict[str, bytes]:
    """Apply the patch to copies of the touched files; the source tree itself stays pristine."""
    if shutil.which("patch") is None:
        raise BuildError("applying a source patch needs GNU patch (apt-get install patch)")
    with tempfile.TemporaryDirectory(prefix="dynamos-patch-") as tmp:
        for rel in files:
            src = tree / rel
            if not src.is_file():
                raise BuildError(f"the patch changes {rel}, which is not in the kernel source "
                                 f"(new files need build-system changes: not supported)", path=patch)
            dest = Path(tmp) / rel
            if not dest.resolve().is_relative_to(Path(tmp).resolve()):
                raise UpdateSourceError(f"file name {rel!r} in the patch leaves the source tree", path=patch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        r = subprocess.run(["patch", "-p1", "--unified", "--batch", "--forward", "--no-backup-if-mismatch", "-d", tmp,
                            "-i", str(patch.absolute())], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"the patch does not apply to this kernel's source:\n{(r.stdout + r.stderr).strip()}",
                             path=patch)
        return {rel: (Path(tmp) / rel).read_bytes() for rel in files}


def build_from_patch(patch: Path, target: TargetKernel, *, output: Path | None = None, name: str | None = None,
                     symtab: SymbolTable | None = None,
                     progress: Callable[[str], None] | None = None, signer: Signer | None = None) -> PatchBuild:
    """Build an update package from a source patch against ``target``.

    ``symtab`` is the target's symbol table at link-time addresses (default: the lab's, fetched
    once per kernel); with the kernel image it checks that the compiled originals are what the
    target runs, and tells which of several same-named statics each reference means.
    """
    say = progress or (lambda _m: None)
    started = time.monotonic()
    patch = Path(patch)
    text = read_patch(patch)
    files = touched_files(text, patch)
    for rel in files:
        for pattern, reason in REFUSED_PATHS:
            if pattern.search(rel):
                raise BuildError(f"{rel}: {reason}", path=patch)
    update_name = name or _NAME_RE.sub("-", patch.stem.lower()).strip("-")[:55] or "patch"

    source = prepare_source(target, say)
    patched = with_compat_headers(patched_texts(patch, source.tree, files))
    touching: dict[str, list[str]] = {}  # translation unit -> the patched files it compiles
    for rel in files:
        for unit in translation_units_of(source.tree, rel):
            touching.setdefault(unit, []).append(rel)
    return build_from_texts(patched, touching, target, name=update_name,
                            description=f"dynamos update from {patch.name}", output=output,
                            symtab=symtab, progress=say, signer=signer, origin=patch,
                            started=started)


def build_from_texts(patched: dict[str, bytes], touching: dict[str, list[str]], target: TargetKernel, *,
                     name: str, description: str, output: Path | None = None, symtab: SymbolTable | None = None,
                     progress: Callable[[str], None] | None = None, signer: Signer | None = None,
                     origin: Path | None = None, tolerant: bool = False, replace_earlier: bool = False,
                     extra: dict[str, object] | None = None, debian: dict[str, object] | None = None,
                     annotate: Annotate | None = None, started: float | None = None,
                     held_back: dict[str, bytes] | None = None) -> PatchBuild:
    """Build an update from the patched texts of files and the units that compile them.

    ``tolerant``: a unit that cannot be built, or whose diff has a refused change, is left out
    (its reason in ``PatchBuild.dropped``) instead of stopping the build; with no unit left, no
    package is written. ``extra`` is merged into the update table (version, cves); ``debian`` is the
    Debian versions and changelog an update built by ``build --to`` corresponds to (manifest key);
    ``annotate``, given the dropped and skipped units and those that do not include the patched
    files, returns them once the units are known. ``held_back``: patched texts of files not carried
    as a whole (a header refused for its reach); a unit whose patched compile fails is compiled
    again with those of them it reads, since a change often needs its release's header change.
    """
    say = progress or (lambda _m: None)
    started = time.monotonic() if started is None else started
    phases: dict[str, float] = {}
    update_name = name
    t = time.monotonic()
    source = prepare_source(target, say)
    phases["source"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    if symtab is None:
        symtab = lab_symbol_table(target, progress=say)
    image_text = kernel_text(target)

    work = cache_root() / "builds" / f"patch-{update_name}-{target.release}"
    units: list[UnitReport] = []
    dropped: dict[str, Refusal] = {}
    includes: dict[str, list[str]] = {}
    not_including: dict[str, list[str]] = {}
    with build_lock(work):
        shutil.rmtree(work, ignore_errors=True)
        (work / "objects").mkdir(parents=True)
        config = read_config(source.tree / ".config")
        skipped: list[str] = []
        for count, (unit, touched) in enumerate(touching.items(), 1):
            if tolerant:
                say(f"unit {count}/{len(touching)}: {unit}")
            obj = module_of(source.tree, unit, config) or VMLINUX
            try:
                report = _compile_and_diff(source, unit, {rel: patched[rel] for rel in touched}, work, target,
                                           symtab, image_text, say, obj,
                                           optional=all(rel.endswith(".h") for rel in touched),
                                           includes=includes, not_including=not_including, held_back=held_back)
            except DynamosError as e:
                if not tolerant:
                    raise
                dropped[unit] = Refusal(code_of(e), str(e))
                continue
            if report is None and unit in not_including and unit not in includes:
                say(f"{unit}: the compiler's dependency output shows it does not include "
                    f"{', '.join(not_including[unit])} under {target.release}'s config: skipped")
            elif report is None:
                skipped.append(unit)
                say(f"{unit} includes {', '.join(touched)} but is not built into {target.release}: skipped")
            else:
                report.directives = apply_directives(
                    report.diff, (work / "objects" / _obj_name(unit, "patched")).read_bytes(), unit)
                if tolerant and report.diff.refused:
                    dropped[unit] = Refusal(first_unaccepted([r.code for r in report.diff.refused]),
                                            "; ".join(f"{r.name}: {r.reason}" for r in report.diff.refused))
                    continue
                units.append(report)
        phases["compile+diff"] = round(time.monotonic() - t, 3)
        refused = [(u.path, r) for u in units for r in u.diff.refused]
        if refused:
            raise BuildError("the patch cannot be live-patched:\n" + "\n".join(
                f"  {path}: {r.name}: {r.reason}" for path, r in refused), path=origin)
        if not any(u.diff.changed or u.diff.new for u in units):
            if tolerant:
                return PatchBuild(update_name, None, units, [], round(time.monotonic() - started, 3), phases,
                                  skipped, dropped, includes, not_including)
            raise BuildError("the patch changes no function's code (comments, or line numbers only?)", path=origin)
        if update_name.replace("-", "_") in {u.object for u in units}:
            # The update's module would carry the patched module's name: livepatch would take the update
            # for that module and resolve its symbols at once, and the real module could not load.
            raise BuildError(f"the update would be named like the module it patches ({update_name}): "
                             f"give it another name (--name)", path=origin)

        t = time.monotonic()
        others = OtherModules.of_target(target, exporters(target.headers_dir / "Module.symvers"))
        functions: list[dict[str, object]] = []  # [[function]] tables, validated like update.toml's
        placeholders: dict[str, KlpSymbol] = {}
        extracted: list[str] = []
        with_callbacks: list[tuple[str, str, Directives, dict[str, str]]] = []
        kept_units: list[UnitReport] = []
        added = update_additions((u.path, u.object, {c.name for c in u.diff.new},
                                  work / "objects" / _obj_name(u.path, "patched")) for u in units)
        uses: dict[str, set[str]] = {}  # unit -> functions of other units of the update it calls
        parts: dict[str, tuple[list[dict[str, object]], str, dict[str, KlpSymbol]]] = {}
        for index, unit in enumerate(units):
            keep = {c.name for c in unit.diff.changed} | {c.name for c in unit.diff.new}
            if not keep:
                kept_units.append(unit)
                continue
            try:
                sympos = SymbolPositions(unit, symtab, module_symbols(target, unit.object))
                # Units reached through a header may each carry a copy of the same static function.
                prefix = edition_prefix(index)
                ext = extract_functions((work / "objects" / _obj_name(unit.path, "patched")).read_bytes(), keep,
                                        {c.name for c in unit.diff.new_data} | unit.statics.stateless,
                                        resolver(unit.path, others, sympos, added, uses.setdefault(unit.path, set())),
                                        edition_prefix=prefix)
                unit_functions = []
                for c in unit.diff.changed:
                    pos = sympos.position(c.name, local=True)
                    unit_functions.append({"name": c.name, "edition": ext.editions[c.name], "object": unit.object,
                                           **({"sympos": pos} if pos else {})})
            except DynamosError as e:
                if not tolerant:
                    raise
                dropped[unit.path] = Refusal(code_of(e), str(e))
                continue
            kept_units.append(unit)
            obj = f"{_obj_name(unit.path, 'ext')}"
            (work / obj).write_bytes(ext.object)
            parts[unit.path] = (unit_functions, obj, ext.klp_placeholders)
            unit.key_sites = ext.key_sites
            with_callbacks.append((unit.path, unit.object, unit.directives, ext.editions))
        for path, why in stranded(uses, added, set(parts)).items():  # tolerant: else extraction raised
            dropped[path] = Refusal(OTHER, why)
        units = [u for u in kept_units if u.path not in dropped]
        with_callbacks = [c for c in with_callbacks if c[0] not in dropped]
        for path, (unit_functions, obj, unit_placeholders) in parts.items():
            if path not in dropped:
                functions += unit_functions
                _write_cmd_file(work, obj)
                extracted.append(obj)
                placeholders.update(unit_placeholders)
        if not functions:
            if tolerant:
                return PatchBuild(update_name, None, units, [], round(time.monotonic() - started, 3), phases,
                                  skipped, dropped, includes, not_including)
            raise BuildError("the patch changes no function's code (comments, or line numbers only?)", path=origin)
        hooks = callback_hooks(with_callbacks, list(dict.fromkeys(str(f["object"]) for f in functions)))
        if annotate is not None:
            extra, debian = annotate(dropped, skipped, not_including)
        table: dict[str, object] = {"name": update_name, "description": description,
                                    **({"replace": True} if replace_earlier else {}), **(extra or {})}
        update = compiled_update_source({"update": table, "function": functions, **({"hooks": hooks} if hooks else {})},
                                        work, origin=origin)
        # kpatch/klp-build callbacks take the object
        update = replace(update, hooks_take_object=bool(hooks), debian=debian)
        main = f"{update.livepatch_name}_main.o"
        namespaces = import_namespaces([work / o for o in extracted], target.headers_dir / "Module.symvers")
        (work / main).with_suffix(".c").write_text(generate_livepatch_source(update, import_namespaces=namespaces))
        (work / "Kbuild").write_text(generate_kbuild(update, main, extracted))
        linked = link_module(work, update, target, say, placeholders)
        phases["link"] = round(time.monotonic() - t, 3)
        (work / BUILD_LOG).write_text(linked.log)

    package_path = None
    if output is not None:
        package_path = write_package_of(Path(output), update, target, linked, signer)
        say(f"wrote {package_path}")
    return PatchBuild(update_name, package_path, units, linked.klp_symbols, round(time.monotonic() - started, 3),
                      phases, skipped, dropped, includes, not_including)


def _obj_name(rel: str, kind: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", rel.removesuffix(".c")) + f"_{kind}.o"


def _compile_and_diff(source: KernelSource, rel: str, patched: dict[str, bytes], work: Path, target: TargetKernel,
                      symtab: SymbolTable, text: KernelText, say: Callable[[str], None], obj: str,
                      optional: bool = False, includes: dict[str, list[str]] | None = None,
                      not_including: dict[str, list[str]] | None = None,
                      held_back: dict[str, bytes] | None = None) -> UnitReport | None:
    """Compile unit ``rel`` as shipped (checked against the target) and with ``patched`` files.

    An ``optional`` unit (one a patched header reached) that the target does not build (it does
    not compile under the target's config, or none of its functions is in the kernel) gives None.
    The original compile's dependency output confirms which patched files the unit really reads
    (recorded in ``includes`` and ``not_including``); one that reads none of them gives None too,
    without compiling its patched side: the static scan of #include lines sees no #ifdef.
    A patched compile that fails is tried again with the ``held_back`` files the unit reads.
    """
    unit = rel.removesuffix(".c") + ".o"
    stable = _stabilised(source, patched)
    times = {}
    t = time.monotonic()
    try:
        orig = compile_original(source, unit, work / "objects" / _obj_name(rel, "original"), progress=say)
    except BuildError:
        if optional:
            return None
        raise
    times["original"] = round(time.monotonic() - t, 3)
    if orig.cached:
        say(f"{rel}: the original object an earlier build compiled is reused")
    if orig.deps is not None:
        read = set(orig.deps)
        others = sorted(p for p in patched if p != rel)
        absent = [p for p in others if p not in read]
        if absent and not_including is not None:
            not_including[rel] = absent
        if others and includes is not None and len(absent) < len(others):
            includes[rel] = [p for p in others if p in read]
        if absent and len(absent) == len(patched):
            return None  # it reads none of the patched files: the same object either way
        patched = {p: v for p, v in patched.items() if p not in absent}
        stable = {p: v for p, v in stable.items() if p not in absent}
    t = time.monotonic()
    if obj == VMLINUX:
        say(f"checking {rel} against the kernel's own text")
        fidelity = check_fidelity(orig.object_path, target, symtab, text=text)
    else:
        say(f"checking {rel} against the shipped module {obj}")
        try:
            shipped = target.module_path(obj)
        except TargetError as e:
            if optional:
                return None
            raise BuildError(f"{rel}: {e}: the target does not build it", code=NOT_BUILT) from e
        symtab, module_text = module_image(shipped.read_bytes(), obj)
        fidelity = check_fidelity(orig.object_path, target, symtab, text=module_text,
                                  against=f"module {obj} of kernel {target.release}")
    if fidelity.functions and len(fidelity.absent) == len(fidelity.functions):
        if optional:
            return None
        raise BuildError(f"{rel}: none of its functions is in {fidelity.against}: the target does not build it",
                         code=NOT_BUILT)
    fidelity.raise_on_mismatch()  # wrong source, config or compiler: nothing built on it holds
    resolved = fidelity.resolved
    times["fidelity"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    say(f"compiling {rel} (patched)")
    new, borrowed = _compile_borrowing(source, rel, patched, stable, work, held_back or {}, orig.deps or (), say)
    patched = {**patched, **{h: held_back[h] for h in borrowed}} if held_back else patched
    times["patched"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    types = refuse_layout_changes(orig.object_path.read_bytes(), new.object_path.read_bytes(), patched, rel, say,
                                  prototypes=bool(borrowed))
    if types:
        times["layout"] = round(time.monotonic() - t, 3)
    before = read_object(orig.object_path)
    after = align_statics(before, read_object(new.object_path))
    diff = diff_objects(before, after)
    statics = resolve_static_locals(rel, before, after, fidelity.data_addresses, symtab, obj)
    for name, how in statics.how.items():
        if name in statics.stateless:
            say(f"{rel}: static {name}: {how}")
        elif statics.found[name].name != name:  # renumbered by one compile or the other
            say(f"{rel}: static {name} is the kernel's {how}")
    return UnitReport(rel, diff, times, resolved, obj, fidelity.summary(), sorted(patched), statics, types=types,
                      borrowed=borrowed)


def _compile_borrowing(source: KernelSource, rel: str, patched: dict[str, bytes], stable: dict[str, bytes],
                       work: Path, held_back: dict[str, bytes], read: tuple[str, ...],
                       say: Callable[[str], None]) -> tuple[CompiledUnit, list[str]]:
    """The patched compile of ``rel``; when it fails, again with the held-back changes it needs
    (builder/borrow.py). Returns the object and what it borrowed."""
    out = work / "objects" / _obj_name(rel, "patched")
    unit = rel.removesuffix(".c") + ".o"

    def compile_with(borrowed: list[str]) -> CompiledUnit:
        return compile_unit(source, unit, out,
                            sources={**stable, **_stabilised(source, {h: held_back[h] for h in borrowed})})
    try:
        return compile_with([]), []
    except BuildError as failed:
        return compile_borrowing(compile_with, failed, held_back, read, source.tree, say, rel)


def _stabilised(source: KernelSource, patched: dict[str, bytes]) -> dict[str, bytes]:
    """The patched texts with their unchanged lines at their original line numbers."""
    stable = {}
    for path, content in patched.items():
        original_text = (source.tree / path).read_text(errors="surrogateescape")
        stable[path] = stabilise_lines(original_text, content.decode(errors="surrogateescape")
                                       ).encode(errors="surrogateescape")
    return stable


def _write_cmd_file(work: Path, obj: str) -> None:
    """Kbuild's modpost reads each object's .cmd file; a prebuilt object needs one too."""
    target = work / obj
    (work / f".{obj}.cmd").write_text(
        f"cmd_{target} := true\n\nsource_{target} := \n\ndeps_{target} := \n\n"
        f"{target}: $(deps_{target})\n\n$(deps_{target}):\n")


