"""Signers: made once, then only read (a lab guest sees the cache read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos.builder import signing
from dynamos.errors import BuildError


def test_lab_key_is_made_once_then_only_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = signing.lab_signer(tmp_path)
    assert first.name.startswith(signing.LAB_SIGNER_NAME) and (tmp_path / "lab-signer/trusted").is_dir()

    def no_writes(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(signing.fcntl, "flock", no_writes)  # as in a guest: no lock can be taken
    assert signing.lab_signer(tmp_path) == first


def test_a_directory_that_is_not_a_signer_is_named(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a signer directory .missing module.key"):
        signing.load_signer(tmp_path)
    signing.new_signer(tmp_path / "s", "x")
    with pytest.raises(BuildError, match="already holds a signer"):
        signing.new_signer(tmp_path / "s", "x")
