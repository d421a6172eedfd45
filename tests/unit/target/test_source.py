"""The target's source tree and single-file compiles, on the real Debian 6.1 source (no mocks).

The first run fetches and prepares ``linux-source-6.1`` (about 30 s with the package present);
the prepared tree then stays in the cache and each compile takes one to two seconds.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.units import CompiledUnit, compile_original, compile_unit
from dynamos.errors import BuildError, TargetError
from dynamos.target import TargetKernel, debian_version
from dynamos.target import source as source_mod
from dynamos.target.source import READY, KernelSource, prepare_source, source_package, source_root

RELEASE = "6.1.0-56-amd64"
CMDLINE = "fs/proc/cmdline.c"
ORIGINAL_LINE = "\tseq_putc(m, '\\n');\n"
PATCHED_LINE = '\tseq_puts(m, " [patched by dynamos]\\n");\n'


@pytest.fixture(scope="module")
def source(target: TargetKernel) -> KernelSource:
    return prepare_source(target)


def sections(path: Path) -> dict[str, bytes]:
    elf = ELFFile(io.BytesIO(path.read_bytes()))
    return {s.name: s.data() for s in elf.iter_sections() if s.header.sh_type != "SHT_NOBITS"}


def tree_snapshot(source: KernelSource) -> tuple[bytes, int, list[str]]:
    """Content and mtime of cmdline.c, and the names in its directory: all must stay as they are."""
    path = source.tree / CMDLINE
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


def test_source_package_name() -> None:
    assert source_package(RELEASE) == "linux-source-6.1"
    assert source_package("6.12.0-1-arm64") == "linux-source-6.12"


def test_prepared_tree_is_the_targets(source: KernelSource, target: TargetKernel) -> None:
    version = debian_version(target)
    assert source.release == RELEASE and source.debian_version == version
    assert (source_root(RELEASE) / READY).read_text().strip() == version
    assert source.tree == source_root(RELEASE) / "linux-source-6.1"
    # What objects see as the release is the target's; Debian's own build keeps kernel.release at the
    # upstream version (6.1.192) and sets KERNELRELEASE on the make line, and so does dynamos.
    assert source.uts_release == target.release
    shipped = target.headers_dir / "include/config/kernel.release"
    assert (source.tree / "include/config/kernel.release").read_text() == shipped.read_text()
    for rel in ("include/generated/utsrelease.h", "include/generated/package.h",
                "include/generated/autoconf.h", "include/generated/compile.h"):
        assert (source.tree / rel).read_bytes() == (target.headers_dir / rel).read_bytes(), rel
    assert source_mod.read_config(source.tree / ".config") == source_mod.read_config(
        target.headers_dir / ".config")
    # Ready sources come straight from the cache.
    assert prepare_source(target) == source


def test_settings_reproduce_debians_build(target: TargetKernel) -> None:
    settings = source_mod._settings_for(target, debian_version(target))
    make_vars, env = settings["make_vars"], settings["env"]
    assert isinstance(make_vars, dict) and isinstance(env, dict)
    assert make_vars["CC"] == "gcc-12" and make_vars["KERNELRELEASE"] == RELEASE
    assert make_vars["DISTRIBUTOR"] == "Debian" and make_vars["DISTRIBUTION_VERSION"] == debian_version(target)
    assert env["KBUILD_BUILD_USER"] == "debian-kernel" and env["KBUILD_BUILD_VERSION"] == "1"
    assert env["KBUILD_BUILD_VERSION_TIMESTAMP"].startswith("Debian ")


def test_compile_original_and_patched(source: KernelSource, tmp_path: Path) -> None:
    before = tree_snapshot(source)
    original_text = before[0].decode()
    assert ORIGINAL_LINE in original_text

    unit = compile_unit(source, "fs/proc/cmdline.o", tmp_path / "orig.o")
    assert isinstance(unit, CompiledUnit)
    assert unit.object_path == tmp_path / "orig.o" and not unit.patched and unit.source_path == CMDLINE
    assert "KCFLAGS=-ffunction-sections -fdata-sections" in unit.command
    assert tree_snapshot(source) == before

    patched_text = original_text.replace(ORIGINAL_LINE, PATCHED_LINE).encode()
    patched = compile_unit(source, CMDLINE, tmp_path, text=patched_text)
    assert patched.object_path == tmp_path / "cmdline.o" and patched.patched

    orig_sections, new_sections = sections(unit.object_path), sections(patched.object_path)
    for found in (orig_sections, new_sections):
        assert ".text.cmdline_proc_show" in found  # function sections are on
        assert ".init.text" in found  # proc_cmdline_init: the kernel's own section attributes still apply
    assert not any(b"patched by dynamos" in data for data in orig_sections.values())
    assert any(b" [patched by dynamos]\n" in data for data in new_sections.values())
    assert orig_sections[".text.cmdline_proc_show"] != new_sections[".text.cmdline_proc_show"]

    # The tree is as it was: same bytes, same mtime, no object or .cmd file of the patched build.
    assert tree_snapshot(source) == before
    assert not (source.tree / "fs/proc/cmdline.o").exists()
    assert not (source.tree / "fs/proc/.cmdline.o.cmd").exists()
    assert not (source_root(RELEASE) / source_mod.JOURNAL).exists()


def test_compile_without_extra_flags(source: KernelSource, tmp_path: Path) -> None:
    unit = compile_unit(source, CMDLINE, tmp_path / "plain.o", extra_cflags=())
    found = sections(unit.object_path)
    assert ".text.cmdline_proc_show" not in found and ".text" in found


def test_compile_error_names_the_line(source: KernelSource, tmp_path: Path) -> None:
    before = tree_snapshot(source)
    lines = before[0].decode().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, start=1) if line == "\treturn 0;\n")
    lines[number - 1] = "\treturn 0\n"  # gcc: expected ';' before '}' token, at this line
    with pytest.raises(BuildError) as info:
        compile_unit(source, CMDLINE, tmp_path / "broken.o", text="".join(lines).encode())
    error = info.value
    assert error.line == number and error.path == Path(CMDLINE)
    assert f"{CMDLINE}:{number}:" in str(error) and "error: expected ';'" in str(error)
    assert not (tmp_path / "broken.o").exists()
    assert tree_snapshot(source) == before


def test_unknown_file(source: KernelSource, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="fs/proc/no_such_file.c does not exist"):
        compile_unit(source, "fs/proc/no_such_file.o", tmp_path / "x.o")
    with pytest.raises(BuildError, match="not a path inside"):
        compile_unit(source, "../../etc/passwd.c", tmp_path / "x.o")
    with pytest.raises(BuildError, match="not a translation unit"):
        compile_unit(source, "fs/proc/Makefile", tmp_path / "x.o")


def test_killed_compile_is_recovered(source: KernelSource, tmp_path: Path) -> None:
    """A compile killed while the patched text was in place: the next use of the tree puts it back."""
    path = source.tree / CMDLINE
    with source_mod.tree_lock(source.release):  # as the killed compile held it: no one else sees this
        before = tree_snapshot(source)
        source_mod.write_journal(source, "fs/proc/cmdline.o", {CMDLINE: (before[0], path.stat())})
        path.write_bytes(b"/* left behind by a killed compile */\n")
    try:
        compile_unit(source, CMDLINE, tmp_path / "after.o")
    finally:
        source_mod.recover(source)  # keep the cached tree pristine even if the assertion below fails
    assert tree_snapshot(source) == before
    assert ".text.cmdline_proc_show" in sections(tmp_path / "after.o")


def test_a_patched_file_the_unit_includes(source: KernelSource, tmp_path: Path) -> None:
    """kernel/sched/debug.c is compiled as part of build_utility.c: patched through ``sources``."""
    debug = source.tree / "kernel/sched/debug.c"
    before = debug.read_bytes(), debug.stat().st_mtime_ns
    patched = before[0].replace(b"\tP(se.nr_migrations);\n",
                                b'\tP(se.nr_migrations);\n\tSEQ_printf(m, "from an included file\\n");\n', 1)
    unit = compile_unit(source, "kernel/sched/build_utility.c", tmp_path / "bu.o",
                        sources={"kernel/sched/debug.c": patched})
    assert unit.patched
    assert any(b"from an included file" in data for data in sections(unit.object_path).values())
    assert (debug.read_bytes(), debug.stat().st_mtime_ns) == before
    assert not (source.tree / "kernel/sched/build_utility.o").exists()


def test_an_original_is_compiled_once_per_prepared_tree(source: KernelSource, tmp_path: Path) -> None:
    before = tree_snapshot(source)
    first = compile_original(source, CMDLINE, tmp_path / "first.o")
    again = compile_original(source, CMDLINE, tmp_path / "again.o")
    assert again.cached and again.source_path == CMDLINE
    assert (tmp_path / "again.o").read_bytes() == (tmp_path / "first.o").read_bytes()
    fresh = compile_unit(source, CMDLINE, tmp_path / "fresh.o")
    assert (tmp_path / "first.o").read_bytes() == fresh.object_path.read_bytes()  # what a compile now gives
    assert first.cached or first.seconds > 0
    assert tree_snapshot(source) == before


def test_unprepared_source_is_refused(tmp_path: Path) -> None:
    fake = KernelSource("6.1.0-56-amd64", "0.0-0", tmp_path / "linux-source-6.1")
    with pytest.raises(BuildError, match="not prepared"):
        compile_unit(fake, CMDLINE, tmp_path / "x.o")


def test_unavailable_version_is_named(tmp_path: Path) -> None:
    wanted = r"linux-source-6\.1 version 6\.1\.0-0, is not available from apt \(apt knows 6"
    with pytest.raises(TargetError, match=wanted):
        source_mod._download("linux-source-6.1", "6.1.0-0", tmp_path / "x.deb", lambda _m: None)


def test_config_change_is_refused(tmp_path: Path) -> None:
    shipped, ours = tmp_path / "shipped", tmp_path / "ours"
    shipped.write_text('CONFIG_CC_VERSION_TEXT="gcc-12 (a)"\nCONFIG_PAHOLE_VERSION=124\nCONFIG_DEBUG_INFO_BTF=y\n')
    ours.write_text('CONFIG_CC_VERSION_TEXT="gcc-12 (b)"\nCONFIG_PAHOLE_VERSION=0\n'
                    "# CONFIG_DEBUG_INFO_BTF is not set\n")
    messages: list[str] = []
    with pytest.raises(TargetError) as info:
        source_mod._compare_config(shipped, ours, RELEASE, messages.append)
    text = str(info.value)
    assert "CONFIG_PAHOLE_VERSION: 124 -> 0" in text and "CONFIG_DEBUG_INFO_BTF: y -> n" in text
    assert "dwarves" in text and "CC_VERSION_TEXT" not in text
    assert any("CONFIG_CC_VERSION_TEXT" in m for m in messages)  # text-only: a warning
    ours.write_text('CONFIG_CC_VERSION_TEXT="gcc-12 (b)"\nCONFIG_PAHOLE_VERSION=124\nCONFIG_DEBUG_INFO_BTF=y\n')
    source_mod._compare_config(shipped, ours, RELEASE, messages.append)


def test_source_package_kept_in_cache(target: TargetKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an installed linux-source of the version, the .deb (downloaded once, kept) is used."""
    monkeypatch.setattr(source_mod, "_installed_tarball", lambda *_args: None)
    version = debian_version(target)
    messages: list[str] = []
    with source_mod.source_tarball("linux-source-6.1", version, messages.append) as tarball:
        assert tarball.name == "linux-source-6.1.tar.xz" and tarball.stat().st_size > 100_000_000
        unpacked = tarball.parent
    assert not unpacked.exists()  # the unpacked .deb is temporary; the .deb itself is kept
    again: list[str] = []
    with source_mod.source_tarball("linux-source-6.1", version, again.append):
        pass
    assert any(m.startswith("source package present:") for m in again)


def test_missing_compiler_is_named(target: TargetKernel) -> None:
    settings = {**source_mod._settings_for(target, debian_version(target)), "compiler": "gcc-99"}
    with pytest.raises(BuildError, match=r"needs gcc-99.*apt-get install gcc-99"):
        source_mod._check_tools(settings, target)


def _small_tree(tmp_path: Path) -> KernelSource:
    """A made-up tree: enough for the journal, which only ever names files inside it."""
    tree = tmp_path / "linux-source-6.1"
    (tree / "fs/proc").mkdir(parents=True)
    (tree / CMDLINE).write_text("original\n")
    return KernelSource("6.1.0-56-amd64", "6.1.192-2", tree)


def test_a_journal_puts_back_what_a_killed_compile_left(tmp_path: Path) -> None:
    small = _small_tree(tmp_path)
    path = small.tree / CMDLINE
    source_mod.write_journal(small, "fs/proc/cmdline.o", {CMDLINE: (path.read_bytes(), path.stat())})
    path.write_text("patched\n")
    (small.tree / "fs/proc/cmdline.o").write_bytes(b"patched object")
    source_mod.recover(small)
    assert path.read_text() == "original\n"
    assert not (small.tree / "fs/proc/cmdline.o").exists() and not source_mod.journal_path(small).exists()


@pytest.mark.parametrize("damage", ["torn", "outside", "digest", "object"])
def test_a_damaged_journal_changes_nothing_and_says_so(tmp_path: Path, damage: str) -> None:
    small = _small_tree(tmp_path)
    path = small.tree / CMDLINE
    source_mod.write_journal(small, "fs/proc/cmdline.o", {CMDLINE: (path.read_bytes(), path.stat())})
    journal = source_mod.journal_path(small)
    record = json.loads(journal.read_text())
    if damage == "torn":
        journal.write_text(journal.read_text()[:40])
    else:
        if damage == "outside":
            record["files"][0]["path"] = "../../../etc/hostname"
        elif damage == "digest":
            record["files"][0]["content"] = b"other\n".hex()
        else:
            record["object"] = "/etc/shadow"
        journal.write_text(json.dumps(record))
    path.write_text("patched\n")
    with pytest.raises(source_mod.DamagedJournal, match="compile journal .* is damaged"):
        source_mod.recover(small)
    assert path.read_text() == "patched\n" and journal.exists()
