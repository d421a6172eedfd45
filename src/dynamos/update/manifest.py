"""Update sources: ``update.toml`` plus the C files holding new editions of kernel functions."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dynamos.errors import ManifestError

MANIFEST_NAME = "update.toml"


@dataclass(frozen=True)
class FunctionSpec:
    """One kernel function replaced by an edition written in the update source."""

    name: str  # function in the target kernel (vmlinux or a module)
    edition: str  # C function in the update source implementing it
    object: str = "vmlinux"  # "vmlinux" or a module name
    sympos: int | None = None  # position among same-named symbols, when ambiguous
    line: int | None = None  # line of the [[function]] table in update.toml


@dataclass(frozen=True)
class UpdateSource:
    """A validated update source directory."""

    directory: Path
    name: str
    description: str
    functions: tuple[FunctionSpec, ...]
    c_files: tuple[Path, ...]
    kernel: str | None = None  # release it is written for; None means the target's release
    replace: bool = False  # atomic replace of earlier updates (cumulative)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def livepatch_name(self) -> str:
        """Module and /sys/kernel/livepatch name: the kernel turns '-' into '_' in module names."""
        return self.name.replace("-", "_")

    @property
    def objects(self) -> tuple[str, ...]:
        """Patched objects in first-seen order."""
        return tuple(dict.fromkeys(f.object for f in self.functions))


_NAME_RE = re.compile(r"^[a-z0-9_-]{1,55}$")


def load_update_source(directory: Path | str) -> UpdateSource:
    """Read and validate an update source; raise ManifestError naming file and line."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in update source", path=directory)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"invalid TOML: {e}", path=path) from e
    upd = data.get("update", {})
    name = upd.get("name", "")
    if not _NAME_RE.match(name):
        raise ManifestError(f"update.name {name!r} must match [a-z0-9_-]{{1,55}}", path=path)
    functions = tuple(
        FunctionSpec(
            name=f["name"],
            edition=f["edition"],
            object=f.get("object", "vmlinux"),
            sympos=f.get("sympos"),
        )
        for f in data.get("function", [])
    )
    c_files = tuple(sorted(directory.glob("*.c")))
    return UpdateSource(
        directory=directory,
        name=name,
        description=upd.get("description", ""),
        functions=functions,
        c_files=c_files,
        kernel=upd.get("kernel"),
        replace=bool(upd.get("replace", False)),
    )
