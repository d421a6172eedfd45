"""manifest.json: its schema, its canonical digest and the checks a package's manifest must pass.

Kept apart from the tar handling in ``package``: the manifest is what signatures vouch for, so
its rules are one readable table plus the checks that the table cannot express.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from dynamos.abi import VMLINUX
from dynamos.errors import PackageError
from dynamos.update.model import CONSISTENCY_MODELS
from dynamos.update.names import name_refusal
from dynamos.update.rules import (
    CVE_RE,
    kernel_symbol_problem,
    module_name_problem,
    release_problem,
    symbol_problem,
    version_problem,
)

FORMAT_VERSION = 1
MANIFEST_MEMBER = "manifest.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9A-Fa-f]{16,128}$")

# manifest.json keys and their JSON types: one row per key, checked in read_package.
_MANIFEST_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "dynamos_version": str,
    "name": str,
    "livepatch_name": str,
    "description": str,
    "kernel_release": str,
    "vermagic": str,
    "replace": bool,
    "functions": list,
    "created": str,
    "digests": dict,
    "klp_symbols": list,
    "manifest_sha256": str,
    "consistency": str,
    "version": str,  # the update's own version; absent: none given
    "cves": list,  # CVE ids it fixes
    "debian": dict,  # build --to: the Debian versions it goes from and to, what it left out, the changelog
    "signer": dict,  # who signed it: name, fingerprint (OpenPGP), module_key_id (X.509); absent: unsigned
}
# Keys a package may lack (written before they existed): their default.
MANIFEST_DEFAULTS: dict[str, Any] = {"consistency": "per-task", "signer": None, "version": None, "cves": [],
                                     "debian": None}
_FUNCTION_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "edition": str,
    "object": str,
    "sympos": (int, type(None)),
    "kthread": bool,  # the main function of a kernel thread the update restarts
}
_FUNCTION_OPTIONAL = frozenset({"kthread"})
_SYMBOL_SCHEMA: dict[str, type | tuple[type, ...]] = {"name": str, "object": str, "sympos": int}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def release_of_vermagic(vermagic: str) -> str:
    """The kernel writes vermagic as UTS_RELEASE followed by flags ("6.1.0-56-amd64 SMP ...")."""
    words = vermagic.split()
    return words[0] if words else ""


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: catches an edited
    manifest (e.g. a changed function list) the member digests cannot see."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def check_manifest(manifest: Any, path: Path, digested: tuple[str, ...]) -> None:
    """Refuse a manifest.json that does not have exactly the keys and types this format has."""

    def bad(what: str) -> PackageError:
        return PackageError(f"{MANIFEST_MEMBER}: {what}", path=path)

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise bad(f"missing or invalid format version {fmt!r}")
    if fmt != FORMAT_VERSION:
        newer = " (written by a newer dynamos: upgrade)" if fmt > FORMAT_VERSION else ""
        raise bad(f"package format {fmt} is not supported; this dynamos reads format {FORMAT_VERSION}{newer}")
    missing = [k for k in _MANIFEST_SCHEMA if k not in manifest and k not in MANIFEST_DEFAULTS]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    unknown = sorted(k for k in manifest if k not in _MANIFEST_SCHEMA)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}")
    for key, types in _MANIFEST_SCHEMA.items():
        if key not in manifest:
            continue
        value = manifest[key]
        if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
            raise bad(f"{key} has the wrong type ({type(value).__name__} {value!r})")

    if manifest["livepatch_name"] != manifest["name"].replace("-", "_"):
        raise bad(f"livepatch_name {manifest['livepatch_name']!r} does not match name {manifest['name']!r}")
    if release_of_vermagic(manifest["vermagic"]) != manifest["kernel_release"]:
        raise bad(
            f"vermagic {manifest['vermagic']!r} does not match kernel_release {manifest['kernel_release']!r}"
        )
    if manifest.get("consistency", MANIFEST_DEFAULTS["consistency"]) not in CONSISTENCY_MODELS:
        raise bad(f"consistency {manifest['consistency']!r} is not per-task or global")
    _check_names(manifest, bad)
    if not manifest["functions"]:
        raise bad("functions is empty")
    for i, func in enumerate(manifest["functions"]):
        if not isinstance(func, dict) or not set(_FUNCTION_SCHEMA) - _FUNCTION_OPTIONAL <= set(func) \
                or not set(func) <= set(_FUNCTION_SCHEMA):
            raise bad(f"functions[{i}] must be an object with keys {', '.join(_FUNCTION_SCHEMA)} "
                      f"({', '.join(sorted(_FUNCTION_OPTIONAL))} optional)")
        for key, types in _FUNCTION_SCHEMA.items():
            wrong_bool = types is not bool and isinstance(func.get(key), bool)
            if key in func and (not isinstance(func[key], types) or wrong_bool):
                raise bad(f"functions[{i}].{key} has the wrong type ({type(func[key]).__name__})")

    for i, sym in enumerate(manifest["klp_symbols"]):
        if not isinstance(sym, dict) or set(sym) != set(_SYMBOL_SCHEMA):
            raise bad(f"klp_symbols[{i}] must be an object with keys {', '.join(_SYMBOL_SCHEMA)}")
        for key, types in _SYMBOL_SCHEMA.items():
            if not isinstance(sym[key], types) or isinstance(sym[key], bool):
                raise bad(f"klp_symbols[{i}].{key} has the wrong type ({type(sym[key]).__name__})")
        if sym["sympos"] < 0:
            raise bad(f"klp_symbols[{i}].sympos {sym['sympos']} is negative")
        _check_symbol(f"klp_symbols[{i}]", sym["name"], sym["object"], bad, kernel_symbol=False)

    if "version" in manifest and version_problem(manifest["version"]):
        raise bad(f"version {manifest['version']!r} {version_problem(manifest['version'])}")
    if not all(isinstance(c, str) and CVE_RE.match(c) for c in manifest.get("cves", [])):
        raise bad(f"cves must be CVE ids (CVE-YYYY-NNNN): {manifest['cves']!r}")
    debian = manifest.get("debian")
    if debian is not None:
        problem = debian_problem(debian)
        if problem:
            raise bad(f"debian {problem}")
    signer = manifest.get("signer")
    if signer is not None:
        keys = {"name", "fingerprint", "module_key_id"}
        if set(signer) != keys or not all(isinstance(v, str) for v in signer.values()):
            raise bad("signer must be an object with string keys name, fingerprint, module_key_id")
        if not _HEX_RE.match(signer["fingerprint"]) or not _HEX_RE.match(signer["module_key_id"]):
            raise bad(f"signer fingerprint/module_key_id must be hex: {signer!r}")
    digests = manifest["digests"]
    if set(digests) != set(digested):
        raise bad(
            f"digests must cover exactly {', '.join(digested)}, has {', '.join(sorted(digests))}"
        )
    for member, digest in digests.items():
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise bad(f"digest of {member} is not a sha256 hex string: {digest!r}")


# The debian table of a build --to update: key -> type.
_DEBIAN_SCHEMA: dict[str, type] = {"package": str, "from": str, "to": str, "partial": bool, "not_carried": list,
                                   "changelog": list, "cves_mentioned": list}


def debian_problem(debian: Any) -> str | None:
    """Why a manifest's debian table is not one build --to writes, or None. Its CVEs are only
    "mentioned": a partial update claims none (the manifest's ``cves`` is what it claims)."""
    if set(debian) != set(_DEBIAN_SCHEMA):
        return f"must have exactly the keys {', '.join(_DEBIAN_SCHEMA)}"
    for key, types in _DEBIAN_SCHEMA.items():
        if not isinstance(debian[key], types):
            return f"{key} has the wrong type ({type(debian[key]).__name__})"
    for key in ("from", "to"):
        if version_problem(debian[key]):
            return f"{key} {debian[key]!r} {version_problem(debian[key])}"
    if not all(isinstance(x, str) for key in ("not_carried", "changelog", "cves_mentioned") for x in debian[key]):
        return "not_carried, changelog and cves_mentioned must be lists of strings"
    return None


def _check_symbol(where: str, name: str, obj: str, bad: Any, *, kernel_symbol: bool) -> None:
    problem = kernel_symbol_problem(name) if kernel_symbol else name_refusal(name)
    if problem:
        raise bad(f"{where}.name {name!r} {problem}")
    problem = None if obj == VMLINUX else module_name_problem(obj)
    if problem:
        raise bad(f"{where}.object {obj!r} {problem}")


def _check_names(manifest: dict[str, Any], bad: Any) -> None:
    """Names that become paths (/sys/kernel/livepatch/<name>, /run/dynamos/updates/<name>.json)
    or symbols the kernel looks up: refused unless they keep the one safe character set."""
    for key in ("name", "livepatch_name"):
        problem = name_refusal(manifest[key]) or module_name_problem(manifest[key])
        if problem:
            raise bad(f"{key} {manifest[key]!r} {problem}")
    problem = release_problem(manifest["kernel_release"])
    if problem:
        raise bad(f"kernel_release {manifest['kernel_release']!r} {problem}")
    for i, func in enumerate(manifest["functions"]):
        if not isinstance(func, dict):
            continue  # the schema check below says what is wrong
        if isinstance(func.get("name"), str) and isinstance(func.get("object"), str):
            _check_symbol(f"functions[{i}]", func["name"], func["object"], bad, kernel_symbol=True)
        edition = func.get("edition")
        if isinstance(edition, str) and edition and symbol_problem(edition):
            raise bad(f"functions[{i}].edition {edition!r} {symbol_problem(edition)}")
        sympos = func.get("sympos")
        if isinstance(sympos, int) and not isinstance(sympos, bool) and sympos < 0:
            raise bad(f"functions[{i}].sympos {sympos} is negative")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON allows a key twice and json keeps the last: two readers could see two manifests."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def parse_manifest(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError as e:
        raise PackageError(f"{MANIFEST_MEMBER} is nested too deeply to be a manifest", path=path) from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise PackageError(f"{MANIFEST_MEMBER} is not valid JSON: {e}", path=path) from e
