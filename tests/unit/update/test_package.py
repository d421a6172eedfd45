"""Update packages: round trip, determinism, and refusal of anything tampered with or malformed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

import dynamos
from dynamos.errors import PackageError
from dynamos.update.model import FunctionSpec, UpdateSource
from dynamos.update.package import (
    FORMAT_VERSION,
    PACKAGE_SUFFIX,
    PackagedFunction,
    PackagedSymbol,
    UpdatePackage,
    package_filename,
    read_package,
    write_package,
)

RELEASE = "6.1.0-56-amd64"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "
MODULE = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4
LOG = "make -C /lib/modules/6.1.0-56-amd64/build M=/tmp/x modules\n  CC [M]  /tmp/x/livepatch.o\n"
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

SOURCE = UpdateSource(
    directory=Path("/nonexistent/cmdline-banner"),
    name="cmdline-banner",
    description="Print a banner in /proc/cmdline",
    functions=(
        FunctionSpec("cmdline_proc_show", "cmdline_proc_show_v2", line=5),
        FunctionSpec("nf_conntrack_in", "nf_conntrack_in_v2", object="nf_conntrack", sympos=2, line=9),
    ),
    c_files=(Path("/nonexistent/cmdline-banner/edition.c"),),
    kernel=RELEASE,
    replace=True,
)


def build(tmp_path: Path, **overrides: object) -> Path:
    args: dict[str, object] = dict(
        source=SOURCE,
        kernel_release=RELEASE,
        vermagic=VERMAGIC,
        module=MODULE,
        build_log=LOG,
        created=CREATED,
    )
    args.update(overrides)
    return write_package(tmp_path / package_filename(SOURCE.name, RELEASE), **args)  # type: ignore[arg-type]


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar.getmembers()]  # type: ignore[union-attr]


def rewrite(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Replace a package's content by the given members, as someone editing it by hand would."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def edit_manifest(path: Path, **changes: object) -> None:
    members = members_of(path)
    out = []
    for name, data in members:
        if name == "manifest.json":
            manifest = json.loads(data)
            for key, value in changes.items():
                if value is None and key != "sympos":
                    manifest.pop(key, None)
                else:
                    manifest[key] = value
            data = json.dumps(manifest).encode()
        out.append((name, data))
    rewrite(path, out)


def read_error(path: Path) -> PackageError:
    with pytest.raises(PackageError) as info:
        read_package(path)
    assert info.value.path == path
    assert info.value.exit_status == 3
    return info.value


# --- writing and reading ----------------------------------------------------------------------


def test_package_filename_says_the_kernel() -> None:
    assert PACKAGE_SUFFIX == ".dynpkg"
    assert package_filename("cmdline-banner", RELEASE) == "cmdline-banner_6.1.0-56-amd64.dynpkg"


@pytest.mark.parametrize(("name", "release"), [("x", "../6.1"), ("x", ""), ("a/b", RELEASE), ("x", "6.1 0")])
def test_package_filename_refuses_path_tricks(name: str, release: str) -> None:
    with pytest.raises(PackageError, match="cannot be part of a package file name"):
        package_filename(name, release)


def test_round_trip(tmp_path: Path) -> None:
    path = build(tmp_path)
    assert path == tmp_path / "cmdline-banner_6.1.0-56-amd64.dynpkg"
    pkg = read_package(path)
    assert isinstance(pkg, UpdatePackage)
    assert pkg.path == path
    assert pkg.module == MODULE
    assert pkg.build_log == LOG
    assert pkg.name == "cmdline-banner"
    assert pkg.livepatch_name == "cmdline_banner"
    assert pkg.description == "Print a banner in /proc/cmdline"
    assert pkg.kernel_release == RELEASE
    assert pkg.vermagic == VERMAGIC
    assert pkg.replace is True
    assert pkg.functions == [
        {"name": "cmdline_proc_show", "edition": "cmdline_proc_show_v2", "object": "vmlinux", "sympos": None},
        {"name": "nf_conntrack_in", "edition": "nf_conntrack_in_v2", "object": "nf_conntrack", "sympos": 2},
    ]
    assert pkg.module_sha256 == hashlib.sha256(MODULE).hexdigest()
    assert pkg.manifest["format"] == FORMAT_VERSION
    assert pkg.manifest["dynamos_version"] == dynamos.__version__
    assert pkg.manifest["created"] == "2026-01-02T03:04:05+00:00"
    assert pkg.manifest["digests"] == {
        "module.ko": hashlib.sha256(MODULE).hexdigest(),
        "build.log": hashlib.sha256(LOG.encode()).hexdigest(),
    }


def test_package_is_a_plain_tar_anyone_can_list(tmp_path: Path) -> None:
    path = build(tmp_path)
    with tarfile.open(path, mode="r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "module.ko", "build.log"]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o644 for i in infos)


def test_functions_property_returns_copies(tmp_path: Path) -> None:
    pkg = read_package(build(tmp_path))
    pkg.functions[0]["name"] = "changed"
    assert pkg.functions[0]["name"] == "cmdline_proc_show"


def test_write_is_deterministic_except_created(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    first = build(tmp_path / "a").read_bytes()
    second = build(tmp_path / "b").read_bytes()
    assert first == second
    later = build(tmp_path / "c", created=datetime(2027, 1, 1, tzinfo=UTC))
    assert later.read_bytes() != first
    differing = [
        name
        for (name, a), (_, b) in zip(members_of(later), members_of(tmp_path / "a" / later.name), strict=True)
        if a != b
    ]
    assert differing == ["manifest.json"]


def test_created_defaults_to_now_in_utc(tmp_path: Path) -> None:
    pkg = read_package(build(tmp_path, created=None))
    created = datetime.fromisoformat(pkg.manifest["created"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60


def test_write_into_directory_uses_package_filename(tmp_path: Path) -> None:
    path = write_package(tmp_path, source=SOURCE, kernel_release=RELEASE, vermagic=VERMAGIC, module=MODULE)
    assert path == tmp_path / "cmdline-banner_6.1.0-56-amd64.dynpkg"
    assert read_package(path).build_log == ""


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = build(tmp_path)
    build(tmp_path, build_log="second build\n")
    assert read_package(path).build_log == "second build\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left


def test_write_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="cannot write package"):
        write_package(
            tmp_path / "missing-dir" / "x.dynpkg",
            source=SOURCE,
            kernel_release=RELEASE,
            vermagic=VERMAGIC,
            module=MODULE,
        )
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_vermagic_of_another_kernel(tmp_path: Path) -> None:
    with pytest.raises(PackageError) as info:
        build(tmp_path, vermagic="6.1.0-57-amd64 SMP preempt mod_unload modversions ")
    assert "vermagic '6.1.0-57-amd64 SMP" in info.value.message
    assert "is not for kernel release '6.1.0-56-amd64'" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_non_elf_module(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="module is not an ELF object"):
        build(tmp_path, module=b"#!/bin/sh\n")


def test_non_utf8_build_log_is_kept_readable(tmp_path: Path) -> None:
    pkg = read_package(build(tmp_path, build_log="warning: \udcff odd byte\n"))
    assert pkg.build_log == "warning: ? odd byte\n"


# --- tampering --------------------------------------------------------------------------------


def test_tampered_module_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    members = [(n, d + b"\x90" if n == "module.ko" else d) for n, d in members_of(path)]
    rewrite(path, members)
    err = read_error(path)
    assert err.message.startswith("module.ko sha256 mismatch: package was modified after it was built")
    assert hashlib.sha256(MODULE).hexdigest() in err.message
    assert str(err).startswith(f"{path}: ")


def test_tampered_module_bytes_in_place_are_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    data = bytearray(path.read_bytes())
    offset = data.index(bytes(range(256)))
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_error(path).message.startswith("module.ko sha256 mismatch")


def test_tampered_build_log_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    rewrite(path, [(n, b"all fine\n" if n == "build.log" else d) for n, d in members_of(path)])
    assert read_error(path).message.startswith("build.log sha256 mismatch")


def test_consistently_edited_manifest_is_refused_by_its_own_digest(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, kernel_release="6.1.0-57-amd64", vermagic="6.1.0-57-amd64 SMP preempt mod_unload ")
    # module.ko and build.log are untouched; the manifest's self-digest still catches the edit.
    assert read_error(path).message == (
        "manifest.json sha256 mismatch: the manifest was modified after the package was built"
    )


def test_changed_release_alone_contradicts_vermagic(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, kernel_release="6.1.0-57-amd64")
    assert read_error(path).message == (
        f"manifest.json: vermagic {VERMAGIC!r} does not match kernel_release '6.1.0-57-amd64'"
    )


def test_typed_entries_are_what_the_kernel_layer_reads(tmp_path: Path) -> None:
    pkg = read_package(build(tmp_path, klp_symbols=[{"name": "sched_schedstats", "object": "vmlinux", "sympos": 0}]))
    assert pkg.patched_functions == (
        PackagedFunction("cmdline_proc_show", "cmdline_proc_show_v2"),
        PackagedFunction("nf_conntrack_in", "nf_conntrack_in_v2", object="nf_conntrack", sympos=2),
    )
    assert pkg.klp_symbol_refs == (PackagedSymbol("sched_schedstats"),)


# --- malformed packages -----------------------------------------------------------------------


def test_extra_member_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    rewrite(path, members_of(path) + [("payload.sh", b"rm -rf /\n")])
    assert read_error(path).message == (
        "not a valid update package: unexpected member(s) 'payload.sh' "
        "(expected manifest.json, module.ko, build.log, and manifest.sig when signed)"
    )


def test_missing_member_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    rewrite(path, [(n, d) for n, d in members_of(path) if n != "build.log"])
    assert read_error(path).message == (
        "not a valid update package: missing member(s) build.log "
        "(expected manifest.json, module.ko, build.log, and manifest.sig when signed)"
    )


def test_duplicated_member_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    members = members_of(path)
    rewrite(path, members + [m for m in members if m[0] == "module.ko"])
    assert "duplicated member(s) module.ko" in read_error(path).message


def test_member_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members_of(path):
            info = tarfile.TarInfo(name)
            if name == "module.ko":
                info.type = tarfile.SYMTYPE
                info.linkname = "/lib/modules/evil.ko"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    assert read_error(path).message == "member module.ko is not a regular file"


def test_not_a_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.dynpkg"
    path.write_bytes(MODULE)
    assert read_error(path).message.startswith("not an update package: not a plain tar archive")


def test_compressed_tar_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    path.write_bytes(gzip.compress(path.read_bytes()))
    assert read_error(path).message.startswith("not an update package: not a plain tar archive")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.dynpkg"
    path.write_bytes(b"")
    assert read_error(path).message.startswith("not an update package")


def test_truncated_package_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(bytes(range(256))) + 100])
    assert read_error(path).message.startswith(("corrupt update package", "not a valid update package"))


def test_missing_package(tmp_path: Path) -> None:
    assert read_error(tmp_path / "nope.dynpkg").message == "no such update package"


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, format=2)
    assert read_error(path).message == (
        "manifest.json: package format 2 is not supported; this dynamos reads format 1 "
        "(written by a newer dynamos: upgrade)"
    )


def test_manifest_not_json_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    rewrite(path, [(n, b"{not json" if n == "manifest.json" else d) for n, d in members_of(path)])
    assert read_error(path).message.startswith("manifest.json is not valid JSON")


def test_manifest_missing_key_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, vermagic=None)
    assert read_error(path).message == "manifest.json: missing key(s) vermagic"


def test_manifest_unknown_key_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, trusted=True)
    assert read_error(path).message == "manifest.json: unknown key(s) trusted"


def test_manifest_wrong_type_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, replace="yes")
    assert read_error(path).message == "manifest.json: replace has the wrong type (str 'yes')"


def test_manifest_digest_removed_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    digests = read_package(path).manifest["digests"]
    edit_manifest(path, digests={"module.ko": digests["module.ko"]})
    assert read_error(path).message == (
        "manifest.json: digests must cover exactly module.ko, build.log, has module.ko"
    )


def test_manifest_function_malformed_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, functions=[{"name": "f", "edition": "f_v2"}])
    assert read_error(path).message == (
        "manifest.json: functions[0] must be an object with keys name, edition, object, sympos, kthread "
        "(kthread optional)"
    )


def test_manifest_function_kthread_must_be_boolean(tmp_path: Path) -> None:
    path = build(tmp_path)
    edit_manifest(path, functions=[{"name": "f", "edition": "f_v2", "object": "vmlinux", "sympos": None,
                                    "kthread": "yes"}])
    assert read_error(path).message == "manifest.json: functions[0].kthread has the wrong type (str)"
