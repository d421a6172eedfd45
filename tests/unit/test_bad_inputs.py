"""A corpus of bad inputs: each is refused with a clear message, never a traceback, and nothing changes.

One table per category (update sources, source patches, damaged packages, forged packages,
wrongly signed packages, commands). Every case says what is refused and where (file and line, field or argument); the
kernel cases run on the simulated kernel (``harness``) and check that its modules, livepatch
directories and /run/dynamos state are exactly as before. Commands run through
``dynamos.cli.main`` with the kernel layer pointed at the simulated kernel (these tests may run as
root: nothing here may reach the real one).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dynamos.kernel
import dynamos.kernel.editions
from dynamos import cli
from dynamos.builder.patch import build_from_patch
from dynamos.errors import DynamosError, PackageError, UpdateSourceError
from dynamos.update.model import UPDATE_TOML
from dynamos.update.package import manifest_digest
from dynamos.update.validate import load_update_source
from tests.support.harness import KernelHarness


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for directories and special files)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


# --- update sources (update.toml and C) ------------------------------------------------------

EDITION_C = "int cmdline_proc_show_v2(void *m, void *v) { return 0; }\n"


def toml(update: str = 'name = "fix"', function: str = 'name = "cmdline_proc_show"\n'
         'edition = "cmdline_proc_show_v2"') -> str:
    return f"[update]\n{update}\ndescription = \"d\"\n\n[[function]]\n{function}\n"


# (id, update.toml text or None, C files, message fragments (bad value / field), line or None)
UPDATE_SOURCES: list[tuple[str, str | None, dict[str, str], tuple[str, ...], int | None]] = [
    ("name-dotdot", toml('name = "../../etc/x"'), {}, ("name", "'../../etc/x'"), 2),
    ("version-slash", toml('name = "fix"\nversion = "1/2"'), {}, ("version", "'1/2'"), 3),
    ("cves-not-list", toml('name = "fix"\ncves = "CVE-2024-1086"'), {}, ("cves must be a list",), 3),
    ("cve-garbage", toml('name = "fix"\ncves = ["CVE-24-1", "CVE-2024-1086"]'), {}, ("'CVE-24-1'", "CVE id"), 3),
    ("cve-twice", toml('name = "fix"\ncves = ["CVE-2024-1086", "CVE-2024-1086"]'), {}, ("listed twice",), 3),
    ("name-slash", toml('name = "a/b"'), {}, ("name", "'a/b'"), 2),
    ("name-uppercase", toml('name = "Fix"'), {}, ("name", "'Fix'", "lowercase"), 2),
    ("name-empty", toml('name = ""'), {}, ("name", "empty"), 2),
    ("name-too-long", toml(f'name = "{"a" * 80}"'), {}, ("name", "characters"), 2),
    ("name-not-string", toml("name = 5"), {}, ("name", "string", "integer"), 2),
    ("function-dotdot", toml(function='name = "../../x"\nedition = "cmdline_proc_show_v2"'), {},
     ("name", "'../../x'", "not a C identifier"), 6),
    ("edition-path", toml(function='name = "cmdline_proc_show"\nedition = "a/b"'), {},
     ("edition", "'a/b'", "C identifier"), 7),
    ("edition-keyword", toml(function='name = "cmdline_proc_show"\nedition = "int"'), {},
     ("edition", "'int'", "C keyword"), 7),
    ("object-dotdot", toml(function='name = "cmdline_proc_show"\nedition = "cmdline_proc_show_v2"\n'
                                    'object = "../mod"'), {}, ("object", "'../mod'"), None),
    ("sympos-zero", toml(function='name = "cmdline_proc_show"\nedition = "cmdline_proc_show_v2"\nsympos = 0'),
     {}, ("sympos", "positive"), None),
    ("sympos-string", toml(function='name = "cmdline_proc_show"\nedition = "cmdline_proc_show_v2"\n'
                                    'sympos = "1"'), {}, ("sympos", "string"), None),
    ("kernel-path", toml('name = "fix"\nkernel = "../6.1"'), {}, ("kernel", "'../6.1'"), 3),
    ("unknown-key", toml('name = "fix"\nnmae = "x"'), {}, ("nmae",), 3),
    ("toml-syntax", "[update\nname = 'fix'\n", {}, ("update.toml",), None),
    ("no-update-toml", None, {}, ("update.toml",), None),
    ("function-as-table", "[update]\nname = \"fix\"\ndescription = \"d\"\n[function]\nname = \"x\"\n", {},
     ("[[function]]",), None),
]


@pytest.mark.parametrize(("toml_text", "c_files", "fragments", "line"),
                         [pytest.param(t, c, f, n, id=i) for i, t, c, f, n in UPDATE_SOURCES])
def test_bad_update_source_is_refused_with_file_and_line(tmp_path: Path, toml_text: str | None,
                                                         c_files: dict[str, str], fragments: tuple[str, ...],
                                                         line: int | None) -> None:
    directory = tmp_path / "src"
    directory.mkdir()
    if toml_text is not None:
        (directory / UPDATE_TOML).write_text(toml_text)
    for name, text in {"edition.c": EDITION_C, **c_files}.items():
        (directory / name).write_text(text)
    before = tree(tmp_path)
    with pytest.raises(UpdateSourceError) as info:
        load_update_source(directory)
    error = info.value
    assert error.exit_status == 2
    assert error.path is not None and error.path.name in (UPDATE_TOML, "src")
    if line is not None:
        assert error.line == line, str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)
    assert tree(tmp_path) == before


# --- source patches (build --patch) ----------------------------------------------------------

HUNK = "@@ -1,1 +1,1 @@\n-int a;\n+int b;\n"


def diff(old: str, new: str) -> str:
    return f"--- {old}\n+++ {new}\n{HUNK}"


# (id, patch text, message fragments, line of the refusal or None)
SOURCE_PATCHES: list[tuple[str, str, tuple[str, ...], int | None]] = [
    ("new-dotdot", diff("a/fs/x.c", "b/../../../tmp/evil.c"), ("'b/../../../tmp/evil.c'", "'..'"), 2),
    ("old-dotdot", diff("a/../../x.c", "b/fs/x.c"), ("'a/../../x.c'", "'..'"), 1),
    ("absolute-new", diff("a/fs/x.c", "/etc/passwd"), ("'/etc/passwd'", "absolute"), 2),
    ("absolute-both", diff("/etc/shadow", "/etc/shadow"), ("'/etc/shadow'", "absolute"), 1),
    ("git-header", "diff --git a/fs/x.c b/../x.c\n" + diff("a/fs/x.c", "b/fs/x.c"), ("'b/../x.c'",), 1),
    ("git-rename", "diff --git a/fs/x.c b/fs/y.c\nrename from fs/x.c\nrename to ../../y.c\n"
     + diff("a/fs/x.c", "b/fs/y.c"), ("'../../y.c'",), 3),
    ("index-line", "Index: ../../etc/x\n" + diff("a/fs/x.c", "b/fs/x.c"), ("'../../etc/x'",), 1),
    ("quoted-name", diff('"a/\\056\\056/x.c"', "b/fs/x.c"), ("quoted",), 1),
    ("second-file", diff("a/fs/x.c", "b/fs/x.c") + diff("a/fs/y.c", "b/fs/../../y.c"), ("'b/fs/../../y.c'",), 7),
    ("context-diff", "*** /etc/passwd\n--- /etc/passwd\n***************\n", ("'/etc/passwd'", "absolute"), 1),
    ("strips-to-nothing", diff("a/fs/x.c", "b/"), ("names no file",), 2),
    ("no-diff", "just some text\n", ("changes no file",), None),
]


@pytest.mark.parametrize(("text", "fragments", "line"),
                         [pytest.param(t, f, n, id=i) for i, t, f, n in SOURCE_PATCHES])
def test_bad_patch_is_refused_before_anything_is_written(tmp_path: Path, text: str, fragments: tuple[str, ...],
                                                         line: int | None) -> None:
    patch = tmp_path / "work" / "fix.patch"
    patch.parent.mkdir()
    patch.write_text(text)
    before = tree(tmp_path)
    with pytest.raises(DynamosError) as info:  # refused before the target is even looked at
        build_from_patch(patch, None)  # type: ignore[arg-type]
    assert "Traceback" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    if line is not None:
        assert isinstance(info.value, UpdateSourceError) and info.value.exit_status == 2
        assert (info.value.path, info.value.line) == (patch, line)
        assert f"{patch}:{line}:" in str(info.value)
    assert tree(tmp_path) == before
    assert not (tmp_path / "evil.c").exists() and not Path("/tmp/evil.c").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_patch_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    patch = tmp_path / "fix.patch"
    if kind == "fifo":
        os.mkfifo(patch)
    elif kind == "directory":
        patch.mkdir()
    with pytest.raises(UpdateSourceError) as info:
        build_from_patch(patch, None)  # type: ignore[arg-type]
    assert info.value.path == patch
    assert ("regular file" if kind != "missing" else "cannot read the patch") in str(info.value)


# --- damaged packages ------------------------------------------------------------------------


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar.getmembers()]  # type: ignore[union-attr]


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def rebuilt(path: Path, change: Callable[[list[tuple[str, bytes]]], list[tuple[tarfile.TarInfo, bytes]]]) -> None:
    path.write_bytes(tar_of(change(members_of(path))))


def special(name: str, kind: bytes, **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, b""


def sparse_module(members: list[tuple[str, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """module.ko as an old-GNU sparse member: 1 KiB stored, 512 MiB when expanded."""
    out = [reg(n, d) for n, d in members if n != "module.ko"]
    info, _ = reg("module.ko", b"")
    info.type = tarfile.GNUTYPE_SPARSE
    info.sparse = [(0, 512), ((512 << 20) - 512, 512)]
    info.size = 1024
    out.append((info, b"\x7fELF" + bytes(1020)))
    return out


def huge_member(path: Path) -> None:
    """A header that claims a 2 GiB build.log (the bytes are not there)."""
    members = [reg(n, d) for n, d in members_of(path) if n != "build.log"]
    info, _ = reg("build.log", b"")
    info.size = 2 << 30
    head = tar_of(members)[:-2 * tarfile.BLOCKSIZE]  # without its end blocks, as tar writes them
    path.write_bytes(head.rstrip(b"\0").ljust(-(-len(head.rstrip(b"\0")) // 512) * 512, b"\0")
                     + info.tobuf(tarfile.GNU_FORMAT) + bytes(4096))


def write_raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def damage_members(change: Callable[[list[tuple[str, bytes]]], list[tuple[tarfile.TarInfo, bytes]]]):
    return lambda path: rebuilt(path, change)


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def make_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def symlink_to_fifo(path: Path) -> None:
    fifo = path.with_name("pipe")
    os.mkfifo(fifo)
    path.unlink()
    path.symlink_to(fifo)


def symlink_to_device(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def append(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes() + data)


def manifest_bytes(data: bytes) -> Callable[[Path], None]:
    return damage_members(lambda ms: [reg(n, data if n == "manifest.json" else d) for n, d in ms])


# (id, how the package is damaged, message fragments)
DAMAGED_PACKAGES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("empty-file", write_raw(b""), ("not a plain tar",)),
    ("not-a-tar", write_raw(b"hello world\n" * 100), ("not a plain tar",)),
    ("gzip", write_raw(b"\x1f\x8b\x08\x00" + bytes(600)), ("not a plain tar",)),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:700]), ("package",)),
    ("fifo", make_fifo, ("a FIFO", "regular file")),
    ("directory", make_dir, ("a directory",)),
    ("symlink-to-fifo", symlink_to_fifo, ("a FIFO",)),
    ("symlink-to-device", symlink_to_device, ("a character device",)),
    ("sparse-member", damage_members(sparse_module), ("module.ko", "sparse")),
    ("huge-member", huge_member, ("build.log", "implausibly large")),
    ("symlink-member", damage_members(lambda ms: [reg(n, d) for n, d in ms if n != "build.log"]
                                      + [special("build.log", tarfile.SYMTYPE, linkname="/etc/shadow")]),
     ("build.log", "not a regular file")),
    ("hardlink-member", damage_members(lambda ms: [reg(n, d) for n, d in ms if n != "build.log"]
                                       + [special("build.log", tarfile.LNKTYPE, linkname="module.ko")]),
     ("build.log", "not a regular file")),
    ("device-member", damage_members(lambda ms: [reg(n, d) for n, d in ms if n != "build.log"]
                                     + [special("build.log", tarfile.CHRTYPE, devmajor=1, devminor=5)]),
     ("build.log", "not a regular file")),
    ("trailing-data", append(b"#!/bin/sh\nrm -rf /\n"), ("trailing data",)),
    ("trailing-tar", append(tar_of([reg("payload.sh", b"echo hi\n")])), ("trailing data",)),
    ("duplicate-member", damage_members(lambda ms: [reg(n, d) for n, d in ms] + [reg("module.ko", b"\x7fELF")]),
     ("duplicated member(s) module.ko",)),
    ("missing-member", damage_members(lambda ms: [reg(n, d) for n, d in ms if n != "build.log"]),
     ("missing member(s) build.log",)),
    ("member-dotdot", damage_members(lambda ms: [reg(n, d) for n, d in ms] + [reg("../../evil", b"x")]),
     ("unexpected member(s) '../../evil'",)),
    ("manifest-not-json", manifest_bytes(b"{not json"), ("manifest.json is not valid JSON",)),
    ("manifest-not-utf8", manifest_bytes(b"\xff\xfe{}"), ("manifest.json is not valid JSON",)),
    ("manifest-nan", manifest_bytes(b'{"format": NaN}'), ("NaN is not JSON",)),
    ("manifest-deep", manifest_bytes(b"[" * 200_000 + b"]" * 200_000), ("manifest.json",)),
    ("manifest-array", manifest_bytes(b"[]"), ("not a JSON object",)),
    ("manifest-too-big", manifest_bytes(b" " * ((1 << 20) + 1)), ("manifest.json", "implausibly large")),
]


# The operation lock is dynamos' own bookkeeping, taken by every changing command before it reads
# its input: it holds the last holder's pid, and says nothing of the kernel's state.
LOCK_FILES = ("run", "run/dynamos", "run/dynamos/lock")


def snapshot(h: KernelHarness) -> dict[str, bytes | None]:
    """The simulated kernel as files: loaded modules, livepatch dirs, sysfs, /run/dynamos state."""
    h.sim.render()
    return {path: data for path, data in tree(h.sim.root).items() if path not in LOCK_FILES}


def assert_refused_package(h: KernelHarness, path: Path, fragments: tuple[str, ...]) -> PackageError:
    before = snapshot(h)
    calls = len(h.sim.calls)
    with pytest.raises(PackageError) as info:
        h.kernel.apply(path)
    error = info.value
    assert error.exit_status == 3
    assert error.path == path and str(path) in str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)
    assert [c for c in h.sim.calls[calls:] if c[0] in ("init_module", "delete_module", "write_attribute")] == []
    assert snapshot(h) == before
    assert not (h.sim.root / "run/dynamos/updates").exists() or not list((h.sim.root / "run/dynamos/updates").iterdir())
    return error


@pytest.mark.parametrize(("damage", "fragments"), [pytest.param(d, f, id=i) for i, d, f in DAMAGED_PACKAGES])
def test_damaged_package_is_refused_and_nothing_changes(harness: KernelHarness, damage: Callable[[Path], None],
                                                        fragments: tuple[str, ...]) -> None:
    path = harness.add("fix-x")
    damage(path)
    assert_refused_package(harness, path, fragments)


# --- forged packages (what the digests and manifest checks catch, signed or not) ----------------


def forged_manifest(change: Callable[[dict[str, Any]], None], *, redigest: bool = True) -> Callable[[Path], None]:
    """Edit manifest.json; with ``redigest`` its own digest is recomputed, as a forger would."""

    def forge(path: Path) -> None:
        members = dict(members_of(path))
        manifest = json.loads(members["manifest.json"])
        change(manifest)
        if redigest:
            manifest["manifest_sha256"] = manifest_digest(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
        path.write_bytes(tar_of([reg(n, d) for n, d in members.items()]))

    return forge


def replace_member(name: str, data: bytes) -> Callable[[Path], None]:
    return damage_members(lambda ms: [reg(n, data if n == name else d) for n, d in ms])


def setter(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        target: Any = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def dup_key(path: Path) -> None:
    members = dict(members_of(path))
    text = members["manifest.json"].decode()
    members["manifest.json"] = text.replace('"name": "fix-x"', '"name": "fix-x", "name": "../../x"', 1).encode()
    assert members["manifest.json"].decode() != text
    path.write_bytes(tar_of([reg(n, d) for n, d in members.items()]))


def evil_symbol(m: dict[str, Any]) -> None:
    m["klp_symbols"] = [{"name": "../x", "object": "vmlinux", "sympos": 0}]


FORGED_PACKAGES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("module-replaced", replace_member("module.ko", b"\x7fELF evil"), ("module.ko sha256 mismatch",)),
    ("build-log-replaced", replace_member("build.log", b"nothing to see"), ("build.log sha256 mismatch",)),
    ("manifest-edited", forged_manifest(setter("description", value="edited"), redigest=False),
     ("manifest.json sha256 mismatch",)),
    ("module-digest-garbage", forged_manifest(setter("digests", "module.ko", value="xyz")),
     ("digest of module.ko", "'xyz'")),
    ("name-dotdot", forged_manifest(setter("name", value="../../x")), ("name '../../x'",)),
    ("livepatch-name-dotdot", forged_manifest(lambda m: m.update(name="..-..-x", livepatch_name="../../x")),
     ("'..-..-x'",)),
    ("livepatch-name-slash", forged_manifest(lambda m: m.update(name="a", livepatch_name="a/b")),
     ("livepatch_name 'a/b'",)),
    ("function-dotdot", forged_manifest(setter("functions", 0, "name", value="../x")),
     ("functions[0].name '../x'",)),
    ("object-dotdot", forged_manifest(setter("functions", 0, "object", value="../m")),
     ("functions[0].object '../m'",)),
    ("edition-path", forged_manifest(setter("functions", 0, "edition", value="a/b")),
     ("functions[0].edition 'a/b'",)),
    ("sympos-negative", forged_manifest(setter("functions", 0, "sympos", value=-1)), ("functions[0].sympos",)),
    ("sympos-string", forged_manifest(setter("functions", 0, "sympos", value="1")),
     ("functions[0].sympos has the wrong type",)),
    ("function-not-object", forged_manifest(setter("functions", 0, value="cmdline_proc_show")),
     ("functions[0] must be an object",)),
    ("klp-symbol-dotdot", forged_manifest(evil_symbol), ("klp_symbols[0].name '../x'",)),
    ("klp-symbol-malformed", forged_manifest(setter("klp_symbols", value=[{"name": "x"}])),
     ("klp_symbols[0] must be an object",)),
    ("release-path", forged_manifest(lambda m: m.update(kernel_release="../x", vermagic="../x SMP")),
     ("kernel_release '../x'",)),
    ("release-mismatch", forged_manifest(setter("kernel_release", value="6.1.0-1-amd64")), ("vermagic",)),
    ("replace-not-bool", forged_manifest(setter("replace", value="yes")), ("replace has the wrong type",)),
    ("name-not-string", forged_manifest(setter("name", value=7)), ("name has the wrong type",)),
    ("format-newer", forged_manifest(setter("format", value=99)), ("format 99", "upgrade")),
    ("unknown-key", forged_manifest(setter("exec", value="rm -rf /")), ("unknown key(s) exec",)),
    ("duplicate-key", dup_key, ("duplicate key 'name'",)),
]


@pytest.mark.parametrize(("forge", "fragments"), [pytest.param(d, f, id=i) for i, d, f in FORGED_PACKAGES])
def test_forged_package_is_refused_and_nothing_changes(harness: KernelHarness, forge: Callable[[Path], None],
                                                       fragments: tuple[str, ...]) -> None:
    path = harness.add("fix-x")
    forge(path)
    assert_refused_package(harness, path, fragments)
    assert not (harness.sim.root / "run/x.json").exists() and not (harness.sim.root / "x.json").exists()


# --- wrongly signed packages (the production policy: a trust store, no unsigned) -------------


def drop_signature(path: Path, *_: Any) -> None:
    replace_members(path, lambda ms: [reg(n, d) for n, d in ms if n != "manifest.sig"])


def replace_members(path: Path, change: Callable[[list[tuple[str, bytes]]], list[tuple[tarfile.TarInfo, bytes]]]):
    path.write_bytes(tar_of(change(members_of(path))))


def signature_of(data: bytes) -> Callable[..., None]:
    return lambda path, *_: replace_members(path, lambda ms: [reg(n, data if n == "manifest.sig" else d)
                                                               for n, d in ms])


def signature_of_other_package(path: Path, h: KernelHarness, signer: Any, _other: Any) -> None:
    other = dict(members_of(h.add("fix-other", "vfs_read", signer=signer)))
    signature_of(other["manifest.sig"])(path)


def sign_claiming(path: Path, h: KernelHarness, signer: Any, other: Any) -> None:
    """Signed by the trusted signer, but the manifest names the other one (both trusted here)."""
    h.trust(other)
    members = dict(members_of(path))
    manifest = json.loads(members["manifest.json"])
    manifest["signer"] = other.manifest_signer()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    members["manifest.sig"] = signer.sign_manifest(members["manifest.json"])
    path.write_bytes(tar_of([reg(n, d) for n, d in members.items()]))


def signed_by_stranger(path: Path, h: KernelHarness, _signer: Any, other: Any) -> None:
    path.write_bytes(h.add("fix-x", signer=other).read_bytes())


def revoke(path: Path, h: KernelHarness, *_: Any) -> None:
    for ring in h.trusted.iterdir():
        ring.unlink()


def symlinked_store(path: Path, h: KernelHarness, *_: Any) -> None:
    """A keyring that is a symlink is not trusted: whoever can plant a link cannot add a signer."""
    for ring in h.trusted.iterdir():
        ring.rename(h.trusted.parent / "elsewhere.gpg")
        ring.symlink_to(h.trusted.parent / "elsewhere.gpg")


def forged_signed(change: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    return lambda path, *_: forged_manifest(change)(path)


SIGNED_PACKAGES: list[tuple[str, Callable[..., None], tuple[str, ...]]] = [
    ("unsigned", drop_signature, ("not signed", "--allow-unsigned")),
    ("stranger", signed_by_stranger, ("not in the trust store", "someone else")),
    ("revoked-signer", revoke, ("no trusted signers", "holds no *.gpg")),
    ("symlinked-keyring", symlinked_store, ("no trusted signers",)),
    ("description-forged", forged_signed(setter("description", value="honest")), ("changed after signing",)),
    ("function-added", forged_signed(lambda m: m["functions"].append(dict(m["functions"][0], name="vfs_read"))),
     ("changed after signing",)),
    ("module-digest-swapped", forged_signed(setter("digests", "module.ko", value="0" * 64)),
     ("module.ko sha256 mismatch",)),
    ("claims-other-signer", forged_signed(setter("signer", "name", value="Debian")), ("changed after signing",)),
    ("signer-not-hex", forged_signed(setter("signer", "fingerprint", value="../../etc")), ("must be hex",)),
    ("signature-garbage", signature_of(b"\x89not a signature at all"), ("valid signature",)),
    ("signature-empty", signature_of(b""), ("valid signature",)),
    ("signature-huge", signature_of(b"\x89" * (65 << 10)), ("manifest.sig is implausibly large",)),
    ("signature-of-other-package", signature_of_other_package, ("changed after signing",)),
    ("signed-claiming-other", sign_claiming, ("but the manifest names",)),
    ("signature-duplicated", lambda path, *_: replace_members(
        path, lambda ms: [reg(n, d) for n, d in ms] + [reg(n, d) for n, d in ms if n == "manifest.sig"]),
     ("duplicated member(s) manifest.sig",)),
]


@pytest.mark.parametrize(("forge", "fragments"), [pytest.param(d, f, id=i) for i, d, f in SIGNED_PACKAGES])
def test_wrongly_signed_package_is_refused_and_nothing_changes(harness: KernelHarness, signer: Any,
                                                               other_signer: Any, forge: Callable[..., None],
                                                               fragments: tuple[str, ...]) -> None:
    harness.use_trust()
    harness.trust(signer)
    path = harness.add("fix-x", signer=signer)
    forge(path, harness, signer, other_signer)
    assert_refused_package(harness, path, fragments)


# --- commands --------------------------------------------------------------------------------


def fake_editions(root: Path) -> None:
    """A loaded update ``up`` with a two-edition function ``f``, as its control files show it."""
    control = root / "sys/module/up/dynamos/f"
    control.mkdir(parents=True)
    (control / "editions").write_text("0 f 3 0 live\n1 f_v2 5 0 live\n")
    (control / "route").write_text("default 1\n")


# (id, argv, exit status, message fragments); "{tmp}" in argv is the test's directory.
COMMANDS: list[tuple[str, list[str], int, tuple[str, ...]]] = [
    ("revert-dotdot", ["revert", "../debug/kprobes"], 64, ("update name '../debug/kprobes'", "command line")),
    ("signer-name-newline", ["signer", "new", "{tmp}/s", "--name", "a\nb"], 4, ("signer name", "no newline")),
    ("signer-no-name", ["signer", "new", "{tmp}/s"], 64, ("--name",)),
    ("revert-empty", ["revert", ""], 64, ("update name ''", "empty")),
    ("revert-absolute", ["revert", "/sys/kernel/debug/kprobes"], 64, ("update name '/sys/kernel/debug/kprobes'",)),
    ("revert-not-loaded", ["revert", "nope"], 5, ("no livepatch named nope",)),
    ("revert-timeout-nan", ["revert", "up", "--timeout", "nan"], 64, ("--timeout", "'nan'")),
    ("status-dotdot", ["status", "../x"], 64, ("update name '../x'",)),
    ("status-unknown", ["status", "nope"], 5, ("no livepatch named nope",)),
    ("blockers-slash", ["blockers", "a/b"], 64, ("update name 'a/b'",)),
    ("apply-missing", ["apply", "{tmp}/missing.dynpkg"], 3, ("no such update package",)),
    ("apply-fifo", ["apply", "{tmp}/fifo"], 3, ("a FIFO",)),
    ("apply-directory", ["apply", "{tmp}"], 3, ("a directory",)),
    ("apply-check-fifo", ["apply", "--check", "{tmp}/fifo"], 3, ("a FIFO",)),
    ("apply-timeout-negative", ["apply", "x.dynpkg", "--timeout", "-1"], 64, ("--timeout", "at least 0")),
    ("switch-pids-abc", ["switch", "up", "f", "1", "--pids", "1,abc"], 64, ("--pids", "'abc' is not a process id")),
    ("switch-pids-zero", ["switch", "up", "f", "1", "--pids", "0"], 64, ("--pids", "positive")),
    ("switch-pids-empty", ["switch", "up", "f", "1", "--pids", ""], 64, ("--pids", "not a process id")),
    ("switch-pids-too-many", ["switch", "up", "f", "1", "--pids", ",".join(map(str, range(1, 40)))], 64,
     ("--pids", "1 to 16")),
    ("switch-cpus-garbage", ["switch", "up", "f", "1", "--cpus", "all"], 64, ("--cpus 'all'", "CPU list")),
    ("switch-cpus-newline", ["switch", "up", "f", "1", "--cpus", "0\nreset"], 64, ("--cpus", "CPU list")),
    ("switch-share-high", ["switch", "up", "f", "1", "--share", "150"], 64, ("--share", "0 to 100", "150")),
    ("switch-share-nan", ["switch", "up", "f", "1", "--share", "nan"], 64, ("--share", "nan")),
    ("switch-share-word", ["switch", "up", "f", "1", "--share", "half"], 64, ("--share 'half'", "not a number")),
    ("switch-update-dotdot", ["switch", "../up", "f", "1"], 64, ("update name '../up'",)),
    ("switch-function-slash", ["switch", "up", "../f", "1"], 64, ("function name '../f'",)),
    ("switch-edition-slash", ["switch", "up", "f", "../1"], 64, ("edition '../1'",)),
    ("switch-unknown-edition", ["switch", "up", "f", "f_v9"], 5, ("no edition 'f_v9'", "1=f_v2")),
    ("switch-unknown-function", ["switch", "up", "g", "1"], 5, ("g is not a multi-edition function",)),
    ("switch-unknown-update", ["switch", "down", "f", "1"], 5, ("no update named down",)),
    ("retire-edition-dotdot", ["retire", "up", "f", ".."], 64, ("edition '..'",)),
    ("retire-timeout-inf", ["retire", "up", "f", "1", "--timeout", "inf"], 64, ("--timeout", "'inf'")),
    ("retire-unknown-edition", ["retire", "up", "f", "9"], 5, ("no edition '9'",)),
    ("monitor-update-dotdot", ["monitor", "--show", "--update", "../x"], 64, ("update name '../x'",)),
    ("monitor-function-slash", ["monitor", "fs/read", "--build-only"], 64, ("function name 'fs/read'",)),
    ("lab-stop-dotdot", ["lab", "stop", "--name", "../../etc"], 64, ("lab name '../../etc'",)),
    ("lab-run-cpus-zero", ["lab", "run", "--cpus", "0", "--", "true"], 64, ("--cpus", "at least 1")),
    ("lab-run-memory-word", ["lab", "run", "--memory", "lots", "--", "true"], 64, ("--memory", "not an integer")),
    ("build-name-slash", ["build", "--patch", "x.patch", "--name", "a/b"], 64, ("update name 'a/b'",)),
]


@pytest.fixture
def cli_on_harness(harness: KernelHarness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> KernelHarness:
    """The CLI with its kernel layer on the simulated kernel (never the real one); multi-edition
    control files of an update ``up`` under ``editions/``."""
    harness.editions_root = tmp_path / "editions"  # type: ignore[attr-defined]
    fake_editions(harness.editions_root)  # type: ignore[attr-defined]
    monkeypatch.setattr(dynamos.kernel, "LiveKernel", lambda *a, **kw: harness.kernel)
    for name in ("switch", "retire"):
        monkeypatch.setattr(dynamos.kernel.editions, name,
                            functools.partial(getattr(dynamos.kernel.editions, name), root=harness.editions_root))
    return harness


@pytest.mark.parametrize(("argv", "status", "fragments"), [pytest.param(a, s, f, id=i) for i, a, s, f in COMMANDS])
def test_bad_command_is_refused_without_a_traceback(cli_on_harness: KernelHarness, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], argv: list[str], status: int,
                                                    fragments: tuple[str, ...]) -> None:
    h = cli_on_harness
    os.mkfifo(tmp_path / "fifo")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(h)
    outside = tree(tmp_path / "pkgs")
    try:
        got = cli.main(argv)
    except SystemExit as e:  # argparse: a usage error naming the argument
        got = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert got == status, captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    assert snapshot(h) == before
    assert tree(tmp_path / "pkgs") == outside
    assert (tmp_path / "editions/sys/module/up/dynamos/f/route").read_text() == "default 1\n"


def test_corpus_is_large_enough() -> None:
    """The brief: at least 60 bad inputs, in named categories."""
    sizes = {"update sources": len(UPDATE_SOURCES), "source patches": len(SOURCE_PATCHES) + 3,
             "damaged packages": len(DAMAGED_PACKAGES), "forged packages": len(FORGED_PACKAGES),
             "commands": len(COMMANDS)}
    assert sum(sizes.values()) >= 60, sizes
    assert hashlib.sha256(b"").hexdigest()  # (digests are what forged packages are checked against)


@pytest.mark.parametrize(("argv", "status"), [pytest.param(a, s, id=i) for i, a, s, _ in COMMANDS])
def test_bad_command_with_json_says_why_on_stdout(cli_on_harness: KernelHarness, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], argv: list[str],
                                                  status: int) -> None:
    """A script that asked for --json gets one object on stdout for a failure too, with the exit
    status it sees and the same message as stderr."""
    os.mkfifo(tmp_path / "fifo")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    at = argv.index("--") if "--" in argv else len(argv)
    got = cli.main([*argv[:at], "--json", *argv[at:]])
    captured = capsys.readouterr()
    assert got == status
    report = json.loads(captured.out)
    assert report["ok"] is False and report["exit_status"] == status
    assert report["error"] and report["error"] in captured.err
    assert isinstance(report["refusals"], list)
