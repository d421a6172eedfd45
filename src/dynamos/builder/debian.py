"""``build --to VERSION``: from the Debian version a kernel runs to a later one, as one update.

The running kernel's exact source is the prepared tree (``target.source``); the ``--to`` version's
source is the same Debian package (``linux-source-6.1``) of that version, extracted once into
``<cache>/versions/``. The trees are compared file by file, each changed file is classified
(carried, refused with a reason code, not built by this kernel's config) and everything that can
be carried goes into one cumulative update (``replace = true``) built by the patch builder in
its tolerant mode, so that one refused file does not stop the others. The manifest records the
versions and the changelog entries between them; a partial update claims no CVE.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dynamos.builder.patch import build_from_texts
from dynamos.builder.refusals import ACCEPTED_CODES, CODES, OTHER_CODES, Refusal  # noqa: F401 (re-exported)
from dynamos.builder.signing import Signer
from dynamos.builder.unitsof import makefile_lines, module_of, translation_units_of
from dynamos.errors import BuildError, TargetError
from dynamos.target import TargetKernel, cache_root
from dynamos.target.debversion import (
    ChangelogEntry,
    archive_versions,
    check_to_version,
    cves_of,
    entries_between,
    parse_changelog,
)
from dynamos.target.fetch import debian_version
from dynamos.target.source import (
    extract_tarball,
    prepare_source,
    read_config,
    source_package,
    source_tarball,
    tree_lock,
)

# A header reaching more units than this is refused for its reach: each unit is compiled twice
# (original and patched) at about 5-15 s on 2 cores, so 20 units keep a build within minutes.
DEFAULT_MAX_UNITS = 20


# The reason codes (issue 10's closed list of acceptable refusals, ACCEPTED_CODES, then the others,
# which count against the coverage target) are builder/refusals.py's, shared with the builder.
CARRIED, REFUSED, NOT_BUILT = "carried", "refused", "not-built"

# Top-level directories whose files never become kernel code.
_NOT_KERNEL = ("Documentation/", "tools/", "scripts/", "samples/", "LICENSES/", "debian/", "usr/", ".", "README",
               "MAINTAINERS", "CREDITS", "COPYING")
_PATH_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"(^|/)(Makefile|Kconfig|Kbuild)[^/]*$"), "build-file",
     "a build file: changes to how the kernel is built do not change running code"),
    (re.compile(r"\.S$"), "assembly", "assembly has no fentry site and no function sections: not live-patchable"),
    (re.compile(r"(^|/)vdso/"), "vdso", "the vDSO is mapped into user space: a livepatch cannot replace it"),
]


# --------------------------------------------------------------------------------------------------
# Source trees and their difference


@dataclass(frozen=True)
class VersionTree:
    version: str
    tree: Path
    changelog: str


def version_tree(package: str, version: str, say: Callable[[str], None]) -> VersionTree:
    """The extracted source of ``package`` ``version`` and its Debian changelog (from the .deb's
    /usr/share/doc), extracted once into ``<cache>/versions/<package>/<version>``."""
    root = cache_root() / "versions" / package / version
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builds extracting the same version wait for each other
        if not (root / "ready").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            with source_tarball(package, version, say) as tarball:
                changelog = tarball.parent.parent / "share/doc" / package / "changelog.Debian.gz"
                if not changelog.is_file():
                    raise TargetError(f"{package} {version} has no {changelog.name} in /usr/share/doc/{package}")
                (root / "changelog.Debian").write_bytes(gzip.decompress(changelog.read_bytes()))
                extract_tarball(tarball, root, say)
            if not (root / package / "Makefile").is_file():
                raise TargetError(f"{package} {version} unpacked no {package}/Makefile in {root}")
            (root / "ready").write_text(version + "\n")
        else:
            say(f"{package} {version}: extracted tree in the cache ({root})")
    return VersionTree(version, root / package, (root / "changelog.Debian").read_text(errors="replace"))


@dataclass(frozen=True)
class Change:
    path: str
    kind: str  # modified, added, removed


def parse_diff_brief(output: str, old: Path, new: Path) -> list[Change]:
    """``diff -rq old new`` lines as changes. Files only in the old tree are ignored unless they are
    source files: the prepared tree also holds what ``make prepare`` generated."""
    changes: list[Change] = []
    old_s, new_s = str(old).rstrip("/"), str(new).rstrip("/")
    for line in output.splitlines():
        m = re.match(r"^Files (.+) and (.+) differ$", line)
        if m and m.group(1).startswith(old_s + "/"):
            changes.append(Change(m.group(1)[len(old_s) + 1:], "modified"))
            continue
        m = re.match(r"^Only in (.+): (.+)$", line)
        if not m:
            continue
        where, name = m.group(1).rstrip("/"), m.group(2)
        if where == new_s or where.startswith(new_s + "/"):
            changes.append(Change(f"{where[len(new_s) + 1:]}/{name}".lstrip("/"), "added"))
    return sorted(changes, key=lambda c: c.path)


def changed_files(old: Path, new: Path, cache: Path | None, say: Callable[[str], None]) -> list[Change]:
    """Files that differ between the two trees (cached in ``cache``: both trees are immutable)."""
    if cache is not None and cache.is_file():
        return [Change(c["path"], c["kind"]) for c in json.loads(cache.read_text())]
    say(f"comparing {old} with {new}")
    r = subprocess.run(["diff", "-rq", str(old), str(new)], capture_output=True, text=True)
    if r.returncode > 1:
        raise BuildError(f"comparing the source trees failed: {r.stderr.strip()[-500:]}")
    changes = parse_diff_brief(r.stdout, old, new)
    if cache is not None:
        cache.write_text(json.dumps([c.__dict__ for c in changes]))
    return changes


# --------------------------------------------------------------------------------------------------
# Per-file classification


def path_refusal(path: str) -> tuple[str, str] | None:
    """(status, code) decided by the path alone, or None: build files, assembly, vDSO,
    and files that are not kernel code at all."""
    if path.startswith(_NOT_KERNEL) or not re.search(r"\.[ch]$|(^|/)(Makefile|Kconfig|Kbuild)[^/]*$|\.S$", path):
        return NOT_BUILT, "not-kernel-code"
    for pattern, code, _reason in _PATH_RULES:
        if pattern.search(path):
            return REFUSED, code
    return None


def path_reason(code: str) -> str:
    for _pattern, c, reason in _PATH_RULES:
        if c == code:
            return reason
    return {"not-kernel-code": "not part of the kernel's code (documentation, tools, scripts)"}.get(code, code)


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
_INCLUDE_DIRS = ("include", "arch/x86/include", "include/uapi", "arch/x86/include/uapi",
                 "arch/x86/include/generated", "include/generated")


class IncludeGraph:
    """Who includes whom in a source tree, from a static scan of its #include lines."""

    def __init__(self, tree: Path, edges: dict[str, set[str]]):
        self.tree = tree
        self.includers = edges  # header -> files that include it

    @classmethod
    def scan(cls, tree: Path, say: Callable[[str], None]) -> IncludeGraph:
        say(f"scanning the #include graph of {tree}")
        r = subprocess.run(["grep", "-rHE", "--include=*.c", "--include=*.h",
                            r'^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]', "."],
                           cwd=tree, capture_output=True, text=True, errors="replace")
        edges: dict[str, set[str]] = {}
        exists: dict[str, bool] = {}

        def is_file(rel: str) -> bool:
            if rel not in exists:
                exists[rel] = (tree / rel).is_file()
            return exists[rel]

        for line in r.stdout.splitlines():
            file, _, rest = line.partition(":")
            m = _INCLUDE_RE.match(rest)
            if not m:
                continue
            file = file.removeprefix("./")
            name = m.group(2)
            found = None
            if m.group(1) == '"':
                local = (Path(file).parent / name).as_posix()
                if ".." in local.split("/"):
                    local = _normalise(local)
                if is_file(local):
                    found = local
            if found is None:
                found = next((f"{d}/{name}" for d in _INCLUDE_DIRS if is_file(f"{d}/{name}")), None)
            if found is not None:
                edges.setdefault(found, set()).add(file)
        return cls(tree, edges)

    def units(self, header: str) -> list[str]:
        """The .c files that compile ``header`` (through any chain of includes), excluding .c files
        that are themselves included by another .c (their includer is the unit)."""
        seen, todo = {header}, [header]
        while todo:
            for includer in self.includers.get(todo.pop(), ()):
                if includer not in seen:
                    seen.add(includer)
                    todo.append(includer)
        return sorted(f for f in seen if f.endswith(".c") and not self.includers.get(f) and _x86_kernel(f))


def _x86_kernel(rel: str) -> bool:
    """Whether a .c file can be part of an x86 kernel (not another architecture's, not a tool's)."""
    if rel.startswith("arch/") and not rel.startswith("arch/x86/"):
        return False
    return not rel.startswith(_NOT_KERNEL)


def _normalise(rel: str) -> str:
    parts: list[str] = []
    for p in rel.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p and p != ".":
            parts.append(p)
    return "/".join(parts)


_COMPOSITE_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)-(?:y|objs)\s*[+:]?=\s*(.*)$")
_OBJ_RE = re.compile(r"^\s*obj-(\$\((CONFIG_[A-Za-z0-9_]+)\)|y|m)\s*[+:]?=\s*(.*)$")


def built_by_config(tree: Path, rel: str, config: dict[str, str], target: TargetKernel) -> bool | None:
    """Whether the target's config builds the .c file ``rel``: True, False, or None when the
    directory's Makefile does not say (composite objects: the build decides). A file of a loadable
    module is built when the target ships that module; a file of another architecture, of a
    directory a parent Makefile enters only under an unset option, or of composite objects only
    under unset options (``bridge-$(CONFIG_BRIDGE_CFM) += br_cfm.o``) is not built."""
    if rel.startswith("arch/") and not rel.startswith("arch/x86/"):
        return False
    if _directory_gated_off(tree, rel, config) or _only_in_unset_composites(tree, rel, config):
        return False
    module = module_of(tree, rel, config)
    if module is not None:
        try:
            target.module_path(module)
            return True
        except TargetError:
            return False
    directory = (tree / rel).parent
    makefile = next((directory / n for n in ("Kbuild", "Makefile") if (directory / n).is_file()), None)
    if makefile is None:
        return None
    obj = Path(rel).with_suffix(".o").name
    lines = makefile.read_text(errors="replace").replace("\\\n", " ").splitlines()
    owners = {obj}  # the file's object, or the composite objects made of it (ext2-y += inode.o)
    for line in lines:
        m = _COMPOSITE_RE.match(line)
        if m and obj in m.group(2).split():
            owners.add(m.group(1) + ".o")
    for line in lines:
        m = _OBJ_RE.match(line)
        if m and owners & set(m.group(3).split()):
            option = m.group(2)
            return option is None or config.get(option, "n") in ("y", "m")
    return None


def _unset(option: str | None, config: dict[str, str]) -> bool:
    return option is not None and config.get(option, "n") not in ("y", "m")


def _directory_gated_off(tree: Path, rel: str, config: dict[str, str]) -> bool:
    """Whether a parent directory's Makefile enters the file's directory (``obj-$(CONFIG_DAMON) +=
    damon/``) only under options the config leaves unset. Top-level directories are not checked."""
    parts = Path(rel).parent.parts
    for depth in range(len(parts) - 1, 0, -1):
        child = parts[depth] + "/"
        options = [m.group(2) for line in makefile_lines(tree.joinpath(*parts[:depth]))
                   if (m := _OBJ_RE.match(line)) and child in m.group(3).split()]
        if options and all(_unset(o, config) for o in options):
            return True
    return False


_COND_COMPOSITE_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)-\$\((CONFIG_[A-Za-z0-9_]+)\)\s*[+:]?=\s*(.*)$")


def _only_in_unset_composites(tree: Path, rel: str, config: dict[str, str]) -> bool:
    """Whether the file's object is named only in composite objects' conditional lists whose
    options are unset (``bridge-$(CONFIG_BRIDGE_CFM) += br_cfm.o``)."""
    obj = Path(rel).with_suffix(".o").name
    conditional: list[str] = []
    for line in makefile_lines((tree / rel).parent):
        m = _COND_COMPOSITE_RE.match(line)
        if m and m.group(1) != "obj" and obj in m.group(3).split():
            conditional.append(m.group(2))
        elif obj in line.partition("=")[2].split() and (_COMPOSITE_RE.match(line) or _OBJ_RE.match(line)):
            return False  # also named unconditionally, or directly as an object
    return bool(conditional) and all(_unset(o, config) for o in conditional)


# --------------------------------------------------------------------------------------------------
# The build


@dataclass
class FileResult:
    path: str
    kind: str  # modified, added, removed
    status: str  # carried, refused, not-built
    code: str = ""  # reason code when refused or not built
    reason: str = ""
    units: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "change": self.kind, "status": self.status, "code": self.code,
                "reason": self.reason, "units": self.units}


@dataclass
class ToBuild:
    package: str
    from_version: str
    to_version: str
    files: list[FileResult]
    changelog: list[ChangelogEntry]
    cves_mentioned: list[str]
    package_path: Path | None
    seconds: float
    explain: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.not_carried)

    @property
    def not_carried(self) -> list[str]:
        return not_carried(self.files)

    @property
    def cves(self) -> list[str]:
        """What the update claims: the changelog's CVEs when every file is carried, else none."""
        return [] if self.partial or self.package_path is None else self.cves_mentioned

    def to_json(self) -> dict[str, object]:
        return {"from": self.from_version, "to": self.to_version, "source_package": self.package,
                "package": str(self.package_path) if self.package_path else None, "partial": self.partial,
                "cves": self.cves, "cves_mentioned": self.cves_mentioned,
                "changelog": [{"version": e.version, "changes": list(e.lines)} for e in self.changelog],
                "files": [f.to_json() for f in self.files],
                "counts": {s: sum(f.status == s for f in self.files) for s in (CARRIED, REFUSED, NOT_BUILT)},
                "seconds": self.seconds}


def not_carried(files: Iterable[FileResult]) -> list[str]:
    """The refused files, by path: what makes an update partial."""
    return sorted(f.path for f in files if f.status == REFUSED)


def update_name(to: str) -> str:
    return "linux-" + re.sub(r"[^a-z0-9]+", "-", to.lower()).strip("-")


def check_versions(target: TargetKernel, to: str, known_versions: list[str] | None = None) -> tuple[str, str]:
    """(source package, version the kernel's image runs) once ``to`` is known to be a later version
    the archive has; refused otherwise. Cheap and prints nothing, so a front end calls it before
    anything else: a bad ``--to`` is then the first and only thing a user reads."""
    package = source_package(target.release)
    running = debian_version(target)  # the image's version: a second build --to starts here again
    check_to_version(running, to, archive_versions(package) if known_versions is None else known_versions, package)
    return package, running


def build_to(target: TargetKernel, to: str, *, output: Path | None, max_units: int = DEFAULT_MAX_UNITS,
             progress: Callable[[str], None] | None = None, signer: Signer | None = None,
             known_versions: list[str] | None = None) -> ToBuild:
    """Build one cumulative update from the Debian version ``target`` runs to ``to``."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    package, running = check_versions(target, to, known_versions)
    source = prepare_source(target, say)
    newer = version_tree(package, to, say)
    with tree_lock(target.release, shared=True):
        changes = changed_files(source.tree, newer.tree,
                                newer.tree.parent / f"diff-from-{running}-{target.release}.json", say)
    entries = entries_between(parse_changelog(newer.changelog), running, to)
    say(f"{package} {running} -> {to}: {len(changes)} file(s) differ")
    return build_changes(target, running, to, changes, lambda rel: (newer.tree / rel).read_bytes(), entries,
                         output=output, max_units=max_units, progress=say, signer=signer, started=started)


def build_changes(target: TargetKernel, running: str, to: str, changes: list[Change],
                  new_text: Callable[[str], bytes], entries: list[ChangelogEntry], *, output: Path | None,
                  max_units: int = DEFAULT_MAX_UNITS, progress: Callable[[str], None] | None = None,
                  signer: Signer | None = None, started: float | None = None) -> ToBuild:
    """Classify each changed file and build what can be carried: the part of ``build_to`` after
    the trees are compared (``new_text`` reads a file of the ``to`` version)."""
    say = progress or (lambda _m: None)
    started = time.monotonic() if started is None else started
    package = source_package(target.release)
    source = prepare_source(target, say)
    mentioned = cves_of(entries)
    config = read_config(source.tree / ".config")
    results: dict[str, FileResult] = {}
    patched: dict[str, bytes] = {}
    held_back: dict[str, bytes] = {}  # headers refused for their reach: a unit that needs one borrows it
    touching: dict[str, list[str]] = {}
    graph: IncludeGraph | None = None
    for change in changes:
        res = FileResult(change.path, change.kind, CARRIED)
        results[change.path] = res
        decided = path_refusal(change.path)
        if decided is not None:
            res.status, res.code = decided
            res.reason = path_reason(res.code)
            continue
        if change.kind != "modified":
            res.status, res.code = REFUSED, f"{change.kind}-file"
            res.reason = ("a new file needs a build-system change to be compiled" if change.kind == "added"
                          else "a removed file cannot be removed from running code")
            continue
        text = new_text(change.path)
        if change.path.endswith(".h"):
            # Whether it changes a layout is told per unit, from the types the compiler emitted
            # for the original and the patched unit (builder/elf/types.py, in the patch builder).
            if change.path.startswith(("include/", "arch/x86/include/")):
                graph = graph or IncludeGraph.scan(source.tree, say)
                units = graph.units(change.path)
            else:
                try:
                    units = translation_units_of(source.tree, change.path)
                except BuildError as e:
                    res.status, res.code, res.reason = REFUSED, "other", str(e)
                    held_back[change.path] = text  # its reach cannot be told: a unit needing it borrows it
                    continue
            if len(units) > max_units:
                res.status, res.code = REFUSED, "header-reach"
                res.reason = f"reaches {len(units)} units, more than --max-units {max_units}"
                held_back[change.path] = text
                continue
        else:
            units = translation_units_of(source.tree, change.path)
            if all(built_by_config(source.tree, u, config, target) is False for u in units):
                res.status, res.code = NOT_BUILT, "not-built"
                res.reason = f"{target.release}'s config does not build it"
                continue
        res.units = units
        patched[change.path] = text
        for unit in units:
            touching.setdefault(unit, []).append(change.path)

    package_path = None
    build = None
    if touching:
        def annotate(dropped: dict[str, Refusal], skipped: list[str],
                     not_including: dict[str, list[str]]) -> tuple[dict[str, object], dict[str, object]]:
            _settle(results, dropped, skipped, not_including)
            left = not_carried(results.values())
            cves = [] if left else mentioned
            extra: dict[str, object] = {"version": to, **({"cves": cves} if cves else {})}
            debian: dict[str, object] = {"package": package, "from": running, "to": to, "partial": bool(left),
                                         "not_carried": left, "changelog": [e.to_text() for e in entries],
                                         "cves_mentioned": mentioned}
            return extra, debian

        partial_note = "" if not mentioned else f"; changelog mentions {', '.join(mentioned)}"
        build = build_from_texts(patched, touching, target, name=update_name(to),
                                 description=f"Debian {package} {running} -> {to}{partial_note}",
                                 output=output, progress=say, signer=signer, tolerant=True, replace_earlier=True,
                                 annotate=annotate, held_back=held_back)
        _settle(results, build.dropped, build.skipped, build.not_including, build.includes)
        _note_borrowed(results, {u.path: u.borrowed for u in build.units if u.borrowed})
        package_path = build.package_path
        if package_path is None:
            for r in results.values():
                if r.status == CARRIED:
                    r.status, r.code = NOT_BUILT, "no-code-change"
                    r.reason = "; ".join(["no function's code changed", *([r.reason] if r.reason else [])])
    files = sorted(results.values(), key=lambda r: r.path)
    return ToBuild(package, running, to, files, entries, mentioned, package_path,
                   round(time.monotonic() - started, 3), build.explain() if build else [])


def _note_borrowed(results: dict[str, FileResult], borrowed: dict[str, list[str]]) -> None:
    """Say which carried units were compiled with a held-back header's change, on both files."""
    for unit, headers in borrowed.items():
        for res in results.values():
            if unit in res.units and res.status == CARRIED:
                res.reason = "; ".join([*([res.reason] if res.reason else []),
                                        f"{unit} compiled with the change to {', '.join(headers)}, which it needs"])
        for header in headers:
            res = results[header]
            res.reason += f"; its change is compiled into {unit}, which needs it"


def _settle(results: dict[str, FileResult], dropped: dict[str, Refusal], skipped: list[str],
            not_including: dict[str, list[str]] | None = None, includes: dict[str, list[str]] | None = None) -> None:
    """A file's status from its units': refused when one was dropped, not built when all were skipped
    or do not include it. A header's reason says how many of its candidate units (the static scan's)
    the compiler's dependency output confirmed (``includes``) and how many do not include it under
    this config (``not_including``)."""
    not_including, includes = not_including or {}, includes or {}
    for res in results.values():
        if res.status != CARRIED or not res.units:
            continue
        absent = [u for u in res.units if res.path in not_including.get(u, ())]
        confirmed = sum(res.path in includes.get(u, ()) for u in res.units)
        skip = [u for u in res.units if u in skipped and u not in absent]
        notes = []
        if res.units != [res.path]:  # reached through includes: the candidates were a static scan's
            notes.append(f"the compiler confirmed {confirmed} of {len(res.units)} candidate unit(s)"
                         + (f"; {len(absent)} {'does' if len(absent) == 1 else 'do'} not include it under this config"
                            if absent else ""))
        if skip:
            notes.append(f"{len(skip)} of its units not built by this config")
        bad = [(u, dropped[u]) for u in res.units if u in dropped]
        if bad:
            res.status, res.code = REFUSED, bad[0][1].code
            res.reason = "; ".join(f"{u}: {why.message}" for u, why in bad)
            if res.code == "not-built":
                res.status = NOT_BUILT
        elif len(absent) + len(skip) == len(res.units):
            res.status, res.code = NOT_BUILT, "not-built"
            res.reason = "; ".join(["no unit that includes it under this config is built", *notes])
        else:
            res.reason = "; ".join(notes)
