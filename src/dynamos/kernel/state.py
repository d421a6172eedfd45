"""dynamos' record of the updates it applied, in ``<root>/run/dynamos/updates/``.

sysfs shows every livepatch but not who loaded it, from which package, or the update's own
name; this record does. It lives under /run because it describes the running kernel: a reboot
(which drops every livepatch) clears it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_DIR = "run/dynamos/updates"


class UpdateRecords:
    """One JSON file per applied update, named after its livepatch."""

    def __init__(self, root: Path):
        self.directory = root / STATE_DIR

    def path(self, livepatch_name: str) -> Path:
        return self.directory / f"{livepatch_name}.json"

    def write(self, livepatch_name: str, record: dict[str, Any]) -> None:
        """Write atomically (rename) so a reader never sees half a record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(livepatch_name)
        tmp = final.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)  # no half-written file left behind (a full disk)
            raise

    def read(self, livepatch_name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(livepatch_name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self, livepatch_name: str) -> bool:
        """Forget an update; False if the record could not be removed (the kernel op still stands)."""
        try:
            self.path(livepatch_name).unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def names(self) -> list[str]:
        try:
            return sorted(p.stem for p in self.directory.glob("*.json"))
        except OSError:
            return []
