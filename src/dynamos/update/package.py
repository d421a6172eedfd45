"""Update packages: one file holding a built livepatch module, its build log and a manifest.

The package is a plain, uncompressed tar with these members::

    manifest.json   what the update is and which kernel it is for, plus the sha256 of the others
    module.ko       the livepatch module (signed with the kernel's module-signature format)
    build.log       the compiler's output, for whoever has to debug the update later
    manifest.sig    a detached OpenPGP signature of manifest.json (absent: unsigned)

A tar because every system can list and unpack it without dynamos; uncompressed because modules
are small and a deterministic byte stream is easy to reason about. Writing is deterministic
(sorted JSON keys, fixed tar metadata) so the same inputs give the same bytes except for the
``created`` time. Reading refuses anything that is not exactly what :func:`write_package` writes.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dynamos
from dynamos.abi import VMLINUX
from dynamos.errors import PackageError
from dynamos.update.manifest import (
    FORMAT_VERSION,
    MANIFEST_DEFAULTS,
    MANIFEST_MEMBER,
    check_manifest,
    manifest_digest,
    parse_manifest,
    release_of_vermagic,
    sha256_hex,
)
from dynamos.update.model import UpdateSource

__all__ = ["FORMAT_VERSION", "MANIFEST_MEMBER", "UpdatePackage", "manifest_digest", "read_package",
           "sha256_hex", "write_package"]

PACKAGE_SUFFIX = ".dynpkg"

MODULE_MEMBER = "module.ko"
BUILD_LOG_MEMBER = "build.log"
SIGNATURE_MEMBER = "manifest.sig"
MEMBERS = (MANIFEST_MEMBER, MODULE_MEMBER, BUILD_LOG_MEMBER)
OPTIONAL_MEMBERS = (SIGNATURE_MEMBER,)
DIGESTED_MEMBERS = (MODULE_MEMBER, BUILD_LOG_MEMBER)

# Caps checked before anything is read: a manifest is a few hundred bytes, a livepatch module a few
# hundred KiB, so a hostile file cannot make dynamos read (or a sparse member expand) much.
MAX_MANIFEST_SIZE = 1 << 20
MAX_MEMBER_SIZE = {MANIFEST_MEMBER: MAX_MANIFEST_SIZE, MODULE_MEMBER: 64 << 20, BUILD_LOG_MEMBER: 16 << 20,
                   SIGNATURE_MEMBER: 64 << 10}
# The members, their headers and tar's end-of-archive blocks padded to a 10 KiB record.
MAX_PACKAGE_SIZE = sum(MAX_MEMBER_SIZE.values()) + 64 * 1024
_TAR_BLOCK = 512
_ELF_MAGIC = b"\x7fELF"
_FILENAME_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")


def package_filename(name: str, release: str) -> str:
    """File name of a package: it says which update and which kernel, so a glance tells a mismatch."""
    for what, value in (("update name", name), ("kernel release", release)):
        if not _FILENAME_PART_RE.match(value):
            raise PackageError(f"{what} {value!r} cannot be part of a package file name")
    return f"{name}_{release}{PACKAGE_SUFFIX}"


@dataclass(frozen=True)
class PackagedFunction:
    """One kernel function the package's module replaces, as its manifest records it."""

    name: str
    edition: str
    object: str = VMLINUX
    sympos: int | None = None  # None: the name is unique in its object
    kthread: bool = False  # the main function of a kernel thread the update restarts

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> PackagedFunction:
        sympos = entry.get("sympos")
        return cls(str(entry["name"]), str(entry.get("edition") or ""), str(entry.get("object") or VMLINUX),
                   int(sympos) if sympos else None, bool(entry.get("kthread")))


@dataclass(frozen=True)
class PackagedSymbol:
    """A non-exported symbol the module reaches through a livepatch relocation."""

    name: str
    object: str = VMLINUX
    sympos: int = 0  # 0: the name is unique in its object; else 1-based position in kallsyms

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> PackagedSymbol:
        return cls(str(entry["name"]), str(entry.get("object", VMLINUX)), int(entry.get("sympos") or 0))


@dataclass(frozen=True)
class UpdatePackage:
    """A verified update package (or one about to be written), as read from ``path``.

    This is the contract of the kernel layer: it reads every field it needs from here, typed
    (``patched_functions``, ``klp_symbol_refs``); ``functions`` and ``klp_symbols`` are the same
    entries in the manifest's JSON form.
    """

    path: Path | None
    manifest: dict[str, Any]  # parsed manifest.json
    module: bytes  # the .ko bytes
    build_log: str
    manifest_bytes: bytes = b""  # manifest.json as stored: what the signature covers
    signature: bytes | None = None  # manifest.sig, None when unsigned

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def livepatch_name(self) -> str:
        """Module and /sys/kernel/livepatch name."""
        return self.manifest["livepatch_name"]

    @property
    def description(self) -> str:
        return self.manifest["description"]

    @property
    def kernel_release(self) -> str:
        return self.manifest["kernel_release"]

    @property
    def vermagic(self) -> str:
        return self.manifest["vermagic"]

    @property
    def replace(self) -> bool:
        return self.manifest["replace"]

    @property
    def consistency(self) -> str:
        """"per-task" (livepatch's model) or "global" (every function switched at one instant)."""
        return self.manifest.get("consistency", MANIFEST_DEFAULTS["consistency"])

    @property
    def klp_symbols(self) -> list[dict[str, Any]]:
        """Non-exported symbols the module reaches through livepatch relocations
        (``{"name", "object", "sympos"}``): checked against kallsyms before loading."""
        return list(self.manifest["klp_symbols"])

    @property
    def functions(self) -> list[dict[str, Any]]:
        """Patched functions: dicts with keys name, edition, object, sympos (copies)."""
        return [dict(f) for f in self.manifest["functions"]]

    @property
    def patched_functions(self) -> tuple[PackagedFunction, ...]:
        """The patched functions, typed."""
        return tuple(PackagedFunction.from_json(f) for f in self.manifest["functions"])

    @property
    def klp_symbol_refs(self) -> tuple[PackagedSymbol, ...]:
        """The livepatch-relocated symbols, typed."""
        return tuple(PackagedSymbol.from_json(s) for s in self.manifest["klp_symbols"])

    @property
    def version(self) -> str | None:
        return self.manifest.get("version")

    @property
    def cves(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("cves", ()))

    @property
    def debian(self) -> dict[str, Any] | None:
        """build --to: the Debian versions it goes from and to, and what it left out."""
        return self.manifest.get("debian")

    @property
    def signer_claim(self) -> dict[str, str] | None:
        """Who the manifest says signed it (name, OpenPGP fingerprint, module key id): a claim
        until the signature is verified against a trust store."""
        return self.manifest.get("signer")

    @property
    def module_sha256(self) -> str:
        return sha256_hex(self.module)


def _build_manifest(
    *,
    source: UpdateSource,
    kernel_release: str,
    vermagic: str,
    module: bytes,
    log_bytes: bytes,
    created: datetime,
    klp_symbols: list[dict[str, Any]],
    signer: dict[str, str] | None,
) -> dict[str, Any]:
    return {**({"signer": signer} if signer else {}),
            **({"version": source.version} if source.version else {}),
            **({"cves": list(source.cves)} if source.cves else {}),
            **({"debian": source.debian} if source.debian else {}),
        "format": FORMAT_VERSION,
        "dynamos_version": dynamos.__version__,
        "name": source.name,
        "livepatch_name": source.livepatch_name,
        "description": source.description,
        "kernel_release": kernel_release,
        "vermagic": vermagic,
        "replace": source.replace,
        "consistency": source.consistency,
        "functions": [
            {"name": f.name, "edition": f.edition, "object": f.object, "sympos": f.sympos,
             **({"kthread": True} if f.kthread else {})}
            for f in source.functions
        ],
        "created": created.astimezone(UTC).isoformat(timespec="seconds"),
        "digests": {MODULE_MEMBER: sha256_hex(module), BUILD_LOG_MEMBER: sha256_hex(log_bytes)},
        "klp_symbols": klp_symbols,
    }


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata (mtime 0, root-owned, 0644) so equal contents give equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_package(
    path: Path | str,
    *,
    source: UpdateSource,
    kernel_release: str,
    vermagic: str,
    module: bytes,
    build_log: str = "",
    created: datetime | None = None,
    klp_symbols: list[dict[str, Any]] | None = None,
    signer: dict[str, str] | None = None,
    sign: Callable[[bytes], bytes] | None = None,
) -> Path:
    """Write an update package atomically and return its path.

    If ``path`` is an existing directory the package is written into it as
    :func:`package_filename`. The file appears complete or not at all (temporary file + rename),
    so a crash never leaves a truncated package for someone to load. With ``sign`` the
    manifest's detached signature (made by ``signer``, whom the manifest names) is stored too;
    the module must already be signed, since the manifest holds its digest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / package_filename(source.name, kernel_release)
    if not kernel_release or kernel_release != kernel_release.strip() or " " in kernel_release:
        raise PackageError(f"invalid kernel release {kernel_release!r}", path=path)
    if release_of_vermagic(vermagic) != kernel_release:
        raise PackageError(
            f"vermagic {vermagic!r} is not for kernel release {kernel_release!r}: "
            "the module was built against another kernel's headers",
            path=path,
        )
    if not module.startswith(_ELF_MAGIC):
        raise PackageError("module is not an ELF object (no \\x7fELF magic)", path=path)

    log_bytes = build_log.encode("utf-8", errors="replace")
    manifest = _build_manifest(
        source=source,
        kernel_release=kernel_release,
        vermagic=vermagic,
        module=module,
        log_bytes=log_bytes,
        created=created or datetime.now(UTC),
        klp_symbols=list(klp_symbols or []),
        signer=signer,
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    members = [(MANIFEST_MEMBER, manifest_bytes), (MODULE_MEMBER, module), (BUILD_LOG_MEMBER, log_bytes)]
    if sign is not None:
        members.append((SIGNATURE_MEMBER, sign(manifest_bytes)))
    data = _tar_bytes(members)

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PackageError(f"cannot write package: {e.strerror}", path=path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PackageError(f"cannot write package: {e.strerror}", path=path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind_of(mode: int) -> str:
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _read_file(path: Path) -> bytes:
    """The package's bytes: a regular file of bounded size, opened so that nothing can block.

    A FIFO or a device would hang or stream forever: they are refused by ``stat`` before any
    open, and the open itself is non-blocking and checked again on the descriptor (the name may
    have been swapped in between).
    """
    try:
        before = os.stat(path)
    except FileNotFoundError as e:
        raise PackageError("no such update package", path=path) from e
    except OSError as e:
        raise PackageError(f"cannot read update package: {e.strerror or e}", path=path) from e
    if not stat.S_ISREG(before.st_mode):
        raise PackageError(f"is {_kind_of(before.st_mode)}, not an update package (a regular file)", path=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PackageError(f"cannot read update package: {e.strerror or e}", path=path) from e
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        if not stat.S_ISREG(now.st_mode):
            raise PackageError(f"is {_kind_of(now.st_mode)}, not an update package (a regular file)", path=path)
        if now.st_size > MAX_PACKAGE_SIZE:
            raise PackageError(f"is {now.st_size} bytes; an update package is at most {MAX_PACKAGE_SIZE}",
                               path=path)
        data = f.read(MAX_PACKAGE_SIZE + 1)
    if len(data) > MAX_PACKAGE_SIZE:
        raise PackageError(f"grew past {MAX_PACKAGE_SIZE} bytes while it was read", path=path)
    return data


def _check_member(info: tarfile.TarInfo, path: Path) -> None:
    """A member must be a plain regular file within its size cap (checked before reading it)."""
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
        kind = "a sparse file" if info.issparse() or info.sparse is not None else "not a regular file"
        raise PackageError(f"member {info.name} is {kind}", path=path)
    cap = MAX_MEMBER_SIZE[info.name]
    if not 0 <= info.size <= cap:
        raise PackageError(f"member {info.name} is implausibly large ({info.size} bytes; at most {cap})", path=path)


def _check_tar_end(data: bytes, infos: list[tarfile.TarInfo], path: Path) -> None:
    """Nothing but tar's zero blocks may follow the last member: hidden bytes are refused."""
    last = max(infos, key=lambda i: i.offset_data)
    end = last.offset_data + -(-last.size // _TAR_BLOCK) * _TAR_BLOCK
    trailer = data[end:]
    if trailer.strip(b"\0") or len(trailer) > tarfile.RECORDSIZE + 2 * _TAR_BLOCK:
        raise PackageError(f"{len(trailer)} bytes of trailing data after the last member "
                           f"({last.name}): not what dynamos writes", path=path)


def _read_members(path: Path) -> dict[str, bytes]:
    """The tar's members by name; refuse anything but exactly the expected regular files."""
    data = _read_file(path)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as e:
        raise PackageError(f"not an update package: not a plain tar archive ({e})", path=path) from e

    members: dict[str, bytes] = {}
    with tar:
        infos: list[tarfile.TarInfo] = []
        while len(infos) <= 2 * (len(MEMBERS) + len(OPTIONAL_MEMBERS)):  # more than that is refused below, by name
            try:
                info = tar.next()
            except (tarfile.TarError, ValueError, OverflowError) as e:
                raise PackageError(f"corrupt update package: {e}", path=path) from e
            if info is None:
                break
            # Checked as it comes: a huge size is refused before the next seek.
            if info.name in MEMBERS or info.name in OPTIONAL_MEMBERS:
                _check_member(info, path)
            infos.append(info)
        names = [i.name for i in infos]
        unexpected = sorted({n for n in names if n not in MEMBERS and n not in OPTIONAL_MEMBERS})
        missing = [n for n in MEMBERS if n not in names]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        problems = []
        if missing:
            problems.append(f"missing member(s) {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected member(s) {', '.join(repr(n) for n in unexpected)}")
        if duplicated:
            problems.append(f"duplicated member(s) {', '.join(duplicated)}")
        if problems:
            raise PackageError(
                f"not a valid update package: {'; '.join(problems)} (expected {', '.join(MEMBERS)}, "
                f"and {', '.join(OPTIONAL_MEMBERS)} when signed)",
                path=path,
            )
        _check_tar_end(data, infos, path)
        for info in infos:
            try:
                f = tar.extractfile(info)
                assert f is not None  # regular file
                content = f.read(info.size)
            except (tarfile.TarError, OSError) as e:
                raise PackageError(f"corrupt update package: cannot read {info.name}: {e}", path=path) from e
            if len(content) != info.size:
                raise PackageError(f"corrupt update package: {info.name} is cut short "
                                   f"({len(content)} of {info.size} bytes)", path=path)
            members[info.name] = content
    return members


def read_package(path: Path | str) -> UpdatePackage:
    """Read and verify an update package; raise PackageError saying what is wrong with it.

    Verified: a plain tar with exactly the expected members, a manifest of this format with
    every key, and sha256 digests of module.ko and build.log matching the manifest. Digests catch
    corruption and careless edits, not an attacker (who can rewrite the manifest too): that is
    what the signature is for, checked by ``update.signature`` against a trust store.
    """
    path = Path(path)
    members = _read_members(path)
    manifest = parse_manifest(members[MANIFEST_MEMBER], path)
    check_manifest(manifest, path, DIGESTED_MEMBERS)
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise PackageError(
            f"{MANIFEST_MEMBER} sha256 mismatch: the manifest was modified after the package was built",
            path=path,
        )

    for member in DIGESTED_MEMBERS:
        actual = sha256_hex(members[member])
        if actual != manifest["digests"][member]:
            raise PackageError(
                f"{member} sha256 mismatch: package was modified after it was built "
                f"(manifest says {manifest['digests'][member]}, content is {actual})",
                path=path,
            )
    module = members[MODULE_MEMBER]
    if not module.startswith(_ELF_MAGIC):
        raise PackageError(f"{MODULE_MEMBER} is not an ELF object", path=path)
    return UpdatePackage(
        path=path,
        manifest=manifest,
        module=module,
        build_log=members[BUILD_LOG_MEMBER].decode("utf-8", errors="replace"),
        manifest_bytes=members[MANIFEST_MEMBER],
        signature=members.get(SIGNATURE_MEMBER),
    )

