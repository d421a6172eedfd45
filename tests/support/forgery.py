"""Forging packages the way an attacker would: the manifest edited and its own digest recomputed,
every other member (the signature included) kept, so only the signature can tell."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamos.update.manifest import manifest_digest


def forge_manifest(path: Path, change: Callable[[dict[str, Any]], None], out: Path | None = None) -> Path:
    """Rewrite ``path``'s manifest.json with ``change`` (into ``out``, default in place)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == "manifest.json":
                manifest = json.loads(data)
                change(manifest)
                manifest["manifest_sha256"] = manifest_digest(manifest)
                data = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = out or path
    target.write_bytes(buf.getvalue())
    return target
