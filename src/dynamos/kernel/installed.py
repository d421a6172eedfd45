"""Installed updates: kept on disk and loaded again at every boot (``kpatch install`` + kpatch.service).

A live update lives as long as the kernel: a reboot drops it. ``install`` keeps a verified copy of
the package under ``/var/lib/dynamos/<release>/`` (one store per kernel release, in install order)
and, for the running release, applies it; ``load --all`` is what boot runs (``dynamos.service``):
every update installed for the running release, in install order, each verified and applied as
``apply`` does, one failure not stopping the rest. Packages for other releases wait for a boot of
their kernel; ``gc`` drops the stores of releases no longer installed (``/lib/modules/<release>``
gone), which the Debian kernel ``postrm.d`` hook runs.

Replace chains: an update built with ``replace = true`` replaces every update live before it, so
at boot the updates installed before the last such update are not loaded (the replacing one
carries them); if it fails to load, the chain before it is loaded in its place, so the kernel
gets the newest set of fixes that does load.

Routes: ``dynamos switch --persist`` stores a function's route (default edition, handler, CPU and
share rules) with the installed package, and boot writes it back after loading; with no stored
route a function keeps the route its update loads with. Rules by pid or cgroup id are not stored:
those ids do not survive a reboot.

Everything here is standard library, like the rest of the kernel layer (what a production host
installs). Each store file is written whole and renamed into place, under the operation lock.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamos.abi import ROUTE_FILE
from dynamos.errors import DynamosError, RefusedError
from dynamos.kernel import editions
from dynamos.kernel import livepatch as lp
from dynamos.kernel.actionlog import now_iso
from dynamos.kernel.modules import normalize_name
from dynamos.kernel.refusals import PreflightRefused, Refusal
from dynamos.update.names import checked_name, name_refusal
from dynamos.update.package import UpdatePackage

STORE_DIR = "var/lib/dynamos"  # under root; <release>/<livepatch>.dynpkg + .json
NOT_RELEASES = frozenset({"accepted"})  # other state kept beside the release stores
PERSISTED_RULES = ("default", "handler", "cpus", "share")  # route lines that mean the same after a boot
EXIT_LOAD_FAILED = 9  # load --all: at least one installed update for this kernel is not live


@dataclass
class InstalledUpdate:
    """One installed package: where it is kept, its place in the install order, its stored routes."""

    name: str  # update name
    livepatch_name: str
    release: str
    seq: int  # install order within the release
    replace: bool
    created: str  # the package's build time (manifest)
    installed: str
    module_sha256: str
    signer: dict[str, str]
    routes: dict[str, list[str]] = field(default_factory=dict)  # function control dir -> route lines
    package: Path = Path()
    source: str = ""  # the path it was installed from

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "livepatch_name": self.livepatch_name, "release": self.release,
                "order": self.seq, "replace": self.replace, "created": self.created, "installed": self.installed,
                "module_sha256": self.module_sha256, "signer": self.signer, "routes": self.routes,
                "package": str(self.package), "source": self.source}

    @classmethod
    def from_json(cls, data: dict[str, Any], package: Path) -> InstalledUpdate:
        return cls(name=str(data["name"]), livepatch_name=str(data["livepatch_name"]), release=str(data["release"]),
                   seq=int(data["order"]), replace=bool(data["replace"]), created=str(data["created"]),
                   installed=str(data["installed"]), module_sha256=str(data["module_sha256"]),
                   signer=dict(data.get("signer") or {}),
                   routes={str(k): [str(line) for line in v] for k, v in (data.get("routes") or {}).items()},
                   package=package, source=str(data.get("source", "")))


class InstalledStore:
    """The files: ``<root>/var/lib/dynamos/<release>/<livepatch>.dynpkg`` and its ``.json``."""

    def __init__(self, root: Path):
        self.directory = Path(root) / STORE_DIR

    def release_dir(self, release: str) -> Path:
        return self.directory / checked_name(release, "kernel release", "the store")

    def releases(self) -> list[str]:
        try:
            dirs = sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return []
        return [d.name for d in dirs
                if d.name not in NOT_RELEASES and not name_refusal(d.name) and any(d.glob("*.json"))]

    def entries(self, release: str) -> list[InstalledUpdate]:
        """The updates installed for ``release``, in install order (unreadable records skipped)."""
        out = []
        for meta in self.release_dir(release).glob("*.json"):
            try:
                out.append(InstalledUpdate.from_json(json.loads(meta.read_text()), meta.with_suffix(".dynpkg")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return sorted(out, key=lambda e: e.seq)

    def find(self, name: str, release: str) -> InstalledUpdate | None:
        wanted = normalize_name(name)
        return next((e for e in self.entries(release) if e.livepatch_name == wanted), None)

    def add(self, pkg: UpdatePackage, source: Path, signer: dict[str, str]) -> InstalledUpdate:
        """Keep ``pkg`` (last in install order; an earlier copy of the same update is replaced)."""
        directory = self.release_dir(pkg.kernel_release)
        directory.mkdir(parents=True, exist_ok=True)
        seq = max((e.seq for e in self.entries(pkg.kernel_release)), default=0) + 1
        entry = InstalledUpdate(name=pkg.name, livepatch_name=pkg.livepatch_name, release=pkg.kernel_release,
                                seq=seq, replace=bool(pkg.replace), created=pkg.manifest["created"],
                                installed=now_iso(), module_sha256=pkg.module_sha256, signer=signer,
                                package=directory / f"{pkg.livepatch_name}.dynpkg", source=str(source))
        _write_atomic(entry.package, source.read_bytes())
        self.save(entry)
        return entry

    def save(self, entry: InstalledUpdate) -> None:
        _write_atomic(entry.package.with_suffix(".json"), (json.dumps(entry.to_json(), indent=2) + "\n").encode())

    def remove(self, entry: InstalledUpdate) -> None:
        entry.package.with_suffix(".json").unlink(missing_ok=True)  # the record first: no half-installed entry
        entry.package.unlink(missing_ok=True)
        try:
            entry.package.parent.rmdir()
        except OSError:
            pass  # other updates remain


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_plan(entries: list[InstalledUpdate]) -> tuple[int, InstalledUpdate | None]:
    """Where loading starts: the last replacing update (the ones before it are carried by it)."""
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].replace:
            return i, entries[i]
    return 0, None


def persistable_route(lines: list[str]) -> tuple[list[str], list[str]]:
    """The route lines a boot can restore, and those it cannot (pid and cgroup rules)."""
    keep = [line for line in lines if line.split(" ", 1)[0] in PERSISTED_RULES]
    return keep, [line for line in lines if line not in keep]


@dataclass
class PersistenceResult:
    """What install, uninstall, load --all or gc did; ``items`` one per package."""

    action: str
    items: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exit_status: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "ok": self.exit_status == 0, "exit_status": self.exit_status,
                "items": self.items, "notes": self.notes}

    def describe(self) -> str:
        lines = [f"{item['name']} ({item['release']}): {item['outcome']}"
                 + (f": {item['message']}" if item.get("message") else "") for item in self.items]
        if not self.items:
            lines.append({"load": "no update is installed for this kernel", "gc": "nothing to remove"}
                         .get(self.action, "nothing done"))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


class Installer:
    """install, uninstall, load --all, gc and stored routes, over a ``LiveKernel`` (its root,
    syscalls, trust policy, lock and log)."""

    def __init__(self, kernel: Any):  # dynamos.kernel.live.LiveKernel (live does not import us)
        self.k = kernel
        self.store = InstalledStore(kernel.root)

    @property
    def release(self) -> str:
        return self.k.sys.release()

    def _require_root(self, what: str) -> None:
        euid = self.k.sys.geteuid()
        if euid != 0:
            raise PreflightRefused(what, [Refusal.make("not-root", euid=euid)])

    def _live_same(self, entry: InstalledUpdate) -> bool:
        """Whether this very package (same module) is live now."""
        patch = lp.read_livepatch(self.k.root, entry.livepatch_name)
        record = self.k.records.read(entry.livepatch_name) or {}
        return patch is not None and patch.enabled and record.get("module_sha256") == entry.module_sha256

    # -- install / uninstall ----------------------------------------------------------------

    def install(self, package_path: Path | str, *, apply: bool = True, timeout: float = 30.0,
                progress: Any = None) -> PersistenceResult:
        """Verify ``package_path`` as apply does, keep it for its release, apply it now if it is
        for the running kernel (unless ``apply`` is False). If that apply fails, the install is
        undone (an earlier installed copy of the update is put back) and the error raised."""
        self._require_root(str(package_path))
        start = self.k.sys.monotonic()
        pkg: UpdatePackage = self.k._read_package(Path(package_path))
        result = PersistenceResult("install")
        with self.k.journal.locked(pkg.livepatch_name):
            signer = self.k._verify(pkg)
            previous = self.store.find(pkg.livepatch_name, pkg.kernel_release)
            kept = (previous.package.read_bytes(), previous.package.with_suffix(".json").read_bytes()) \
                if previous is not None else None
            entry = self.store.add(pkg, Path(package_path), signer.to_json())
            if previous is not None and previous.routes:
                entry.routes = previous.routes  # a newer build of the same update keeps its stored routes
                self.store.save(entry)
            item: dict[str, Any] = {"name": pkg.name, "livepatch_name": pkg.livepatch_name,
                                    "release": pkg.kernel_release, "order": entry.seq,
                                    "stored": str(entry.package), "signer": signer.to_json()}
            result.items.append(item)
            if previous is not None:
                result.notes.append(f"replaced the installed package of {pkg.name} built {previous.created}")
            if pkg.replace:
                carried = [e.name for e in self.store.entries(pkg.kernel_release) if e.seq < entry.seq]
                if carried:
                    result.notes.append(f"{pkg.name} replaces every update before it: at boot "
                                        f"{', '.join(carried)} will not load (it carries them)")
            self.k.log.record("install", pkg.livepatch_name, "ok", self.k.sys.monotonic() - start,
                              {"release": pkg.kernel_release, "stored": str(entry.package), "order": entry.seq})
            if not apply:
                item["outcome"], item["message"] = "installed", "not applied now (--no-apply)"
            elif pkg.kernel_release != self.release:
                item["outcome"] = "installed"
                item["message"] = f"for kernel {pkg.kernel_release}, not the running {self.release}: loads at its boot"
            elif self._live_same(entry):
                item["outcome"], item["message"] = "installed", "already live"
            else:
                try:
                    applied = self.k.apply(entry.package, timeout=timeout, progress=progress)
                except BaseException:
                    self._undo_add(entry, kept)  # what is installed is what was accepted to run
                    raise
                item["outcome"], item["applied"] = "installed and applied", applied.to_json()
        return result

    def _undo_add(self, entry: InstalledUpdate, kept: tuple[bytes, bytes] | None) -> None:
        """Take back an install whose apply failed: the earlier copy of the update, if any, returns."""
        if kept is None:
            self.store.remove(entry)
        else:
            _write_atomic(entry.package, kept[0])
            _write_atomic(entry.package.with_suffix(".json"), kept[1])
        self.k.log.record("install", entry.livepatch_name, "undone", 0.0,
                          {"release": entry.release, "why": "the apply failed", "restored_earlier": kept is not None})

    def uninstall(self, name: str, *, release: str | None = None, timeout: float = 30.0,
                  progress: Any = None) -> PersistenceResult:
        """Revert the update if it is live (running release), and remove it from the store;
        the notes say what this does to a replace chain."""
        lp_name = normalize_name(checked_name(name, "update name", "the caller"))
        self._require_root(lp_name)
        release = release or self.release
        start = self.k.sys.monotonic()
        result = PersistenceResult("uninstall")
        with self.k.journal.locked(lp_name):
            entries = self.store.entries(release)
            entry = next((e for e in entries if e.livepatch_name == lp_name), None)
            if entry is None:
                known = ", ".join(e.name for e in entries) or "none"
                raise RefusedError(f"no update named {lp_name} is installed for kernel {release} (installed: {known})")
            item: dict[str, Any] = {"name": entry.name, "livepatch_name": lp_name, "release": release,
                                    "outcome": "uninstalled"}
            result.items.append(item)
            result.notes += self._chain_notes(entries, entry)
            if release == self.release and lp.read_livepatch(self.k.root, lp_name) is not None:
                reverted = self.k.revert(lp_name, timeout=timeout, progress=progress)
                item["outcome"], item["reverted"] = "reverted and uninstalled", reverted.to_json()
            self.store.remove(entry)
            self.k.log.record("uninstall", lp_name, "ok", self.k.sys.monotonic() - start,
                              {"release": release, "outcome": item["outcome"], "notes": result.notes})
        return result

    def _chain_notes(self, entries: list[InstalledUpdate], entry: InstalledUpdate) -> list[str]:
        """What removing ``entry`` does to the replace chain: which updates boot loads then."""
        start, base = load_plan(entries)
        rest = [e for e in entries if e is not entry]
        new_start, _ = load_plan(rest)
        before = {e.livepatch_name for e in entries[start:] if e is not entry}
        after = rest[new_start:]
        back = [e.name for e in after if e.livepatch_name not in before]
        notes = []
        if entry.replace and entry is base:
            carried = [e.name for e in entries[:start]]
            if carried:
                notes.append(f"{entry.name} was the base of a replace chain (it carried {', '.join(carried)}); "
                             f"at the next boot, or with `dynamos load --all`, these load again: {', '.join(back)}"
                             + ("" if entry.release != self.release else
                                "; they are not applied now (the running kernel keeps the other live updates)"))
            later = [e.name for e in entries[start + 1:]]
            if later:
                notes.append(f"the updates installed after it stay installed: {', '.join(later)}")
        elif entries.index(entry) < start and base is not None:
            notes.append(f"{entry.name} was replaced by {base.name} (installed later): boot did not load it")
        return notes

    # -- boot: load --all -------------------------------------------------------------------

    def load_all(self, *, timeout: float = 30.0, progress: Any = None) -> PersistenceResult:
        """Load every update installed for the running kernel, in install order (see the module
        doc for replace chains), restoring stored routes; one failure does not stop the rest."""
        self._require_root("load --all")
        result = PersistenceResult("load")
        running = self.release
        with self.k.journal.locked("load --all"):
            for release in self.store.releases():
                if release == running:
                    continue
                for e in self.store.entries(release):
                    message = f"installed for kernel {release}; this kernel is {running}"
                    result.items.append({"name": e.name, "livepatch_name": e.livepatch_name, "release": release,
                                         "outcome": "skipped", "message": message})
                    self.k.log.record("load", e.livepatch_name, "skipped", 0.0, {"release": release,
                                                                                "running": running})
            entries = self.store.entries(running)
            items = {e.livepatch_name: {"name": e.name, "livepatch_name": e.livepatch_name, "release": running,
                                        "order": e.seq} for e in entries}
            self._load_chain(entries, len(entries), items, timeout, progress)
            result.items += [items[e.livepatch_name] for e in entries]
        failed = [i for i in result.items if i["outcome"] == "failed" or i.get("route_errors")]
        result.exit_status = EXIT_LOAD_FAILED if failed else 0
        if failed:
            result.notes.append(f"{len(failed)} installed update(s) for {running} not fully restored: "
                                + ", ".join(i["name"] for i in failed))
        return result

    def _load_chain(self, entries: list[InstalledUpdate], end: int, items: dict[str, dict[str, Any]],
                    timeout: float, progress: Any) -> None:
        """Load ``entries[:end]``: from its last replacing update on; if that one fails, the
        chain before it first (recursively), then the ones after it."""
        start, base = load_plan(entries[:end])
        if base is not None:
            if self._load_one(base, items[base.livepatch_name], timeout, progress):
                for e in entries[:start]:
                    items[e.livepatch_name].update(outcome="replaced", message=f"carried by {base.name}")
            else:
                self._load_chain(entries, start, items, timeout, progress)
            start += 1
        for e in entries[start:end]:
            self._load_one(e, items[e.livepatch_name], timeout, progress)

    def _load_one(self, entry: InstalledUpdate, item: dict[str, Any], timeout: float, progress: Any) -> bool:
        try:
            if self._live_same(entry):
                item["outcome"] = "already live"
            else:
                applied = self.k.apply(entry.package, timeout=timeout, progress=progress)
                item.update(outcome="loaded", seconds=applied.seconds, notes=applied.notes)
        except DynamosError as e:
            item.update(outcome="failed", message=str(e), exit_status=e.exit_status, refusals=e.refusals())
            return False
        except OSError as e:  # the stored package vanished or cannot be read
            item.update(outcome="failed", message=f"{entry.package}: {e.strerror or e}", exit_status=1)
            return False
        if entry.routes:
            item["routes"], errors = self._restore_routes(entry)
            if errors:
                item["route_errors"] = errors
        return True

    def _restore_routes(self, entry: InstalledUpdate) -> tuple[dict[str, list[str]], list[str]]:
        """Write each stored route back: ``reset`` then its lines, through the control files."""
        restored: dict[str, list[str]] = {}
        errors: list[str] = []
        for function, lines in entry.routes.items():
            path = editions.control_root(entry.livepatch_name, self.k.root) / function / ROUTE_FILE
            try:
                for line in ["reset", *lines]:
                    self.k.sys.write_attribute(str(path), line.encode())
            except OSError as e:
                errors.append(f"{function}: route {'; '.join(lines)} not restored: {e.strerror or e}")
                continue
            restored[function] = lines
        self.k.log.record("switch", entry.livepatch_name, "failed" if errors else "ok", 0.0,
                          {"restored": restored, "errors": errors, "by": "load --all"})
        return restored, errors

    # -- routes -----------------------------------------------------------------------------

    def installed_for_running(self, update: str) -> InstalledUpdate:
        """The installed entry of a live update, or RefusedError (``switch --persist`` needs one)."""
        entry = self.store.find(update, self.release)
        if entry is None:
            raise RefusedError(f"{normalize_name(update)} is not installed for kernel {self.release}: "
                               "--persist stores the route with the installed package (`dynamos install PKG` first)")
        return entry

    def persist_route(self, update: str, function: str, lines: list[str] | None) -> tuple[list[str], list[str]]:
        """Store ``lines`` (a route as the control file shows it) for boot; None forgets the stored
        route (boot keeps the update's own). The lines kept, and those dropped (pid/cgroup rules)."""
        with self.k.journal.locked(normalize_name(update)):
            entry = self.installed_for_running(update)
            if lines is None:
                entry.routes.pop(function, None)
                kept, dropped = [], []
            else:
                kept, dropped = persistable_route(lines)
                entry.routes[function] = kept
            self.store.save(entry)
            self.k.log.record("persist-route", entry.livepatch_name, "ok", 0.0,
                              {"function": function, "route": kept, "dropped": dropped})
        return kept, dropped

    # -- listing and gc ---------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        running = self.release
        out = []
        for release in self.store.releases():
            for e in self.store.entries(release):
                out.append({**e.to_json(), "running_release": release == running,
                            "live": release == running and self._live_same(e)})
        return out

    def gc(self) -> PersistenceResult:
        """Remove the stores of kernel releases no longer installed (``/lib/modules/<release>``
        gone); never the running release's."""
        self._require_root("gc")
        result = PersistenceResult("gc")
        running = self.release
        with self.k.journal.locked("gc"):
            for release in self.store.releases():
                if release == running or (self.k.root / "lib/modules" / release).is_dir():
                    continue
                names = [e.name for e in self.store.entries(release)]
                shutil.rmtree(self.store.release_dir(release))
                for name in names:
                    result.items.append({"name": name, "release": release, "outcome": "removed",
                                         "message": f"/lib/modules/{release} is gone"})
                self.k.log.record("gc", release, "ok", 0.0, {"removed": names})
        return result
