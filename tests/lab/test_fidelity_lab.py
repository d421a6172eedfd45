"""Fidelity check on the real target: Debian's source compiled here against the shipped kernel text.

The symbol table comes from the target booted in the lab with ``nokaslr``; the objects from the
target's own source (``dynamos.builder.source``), compiled the way the diff builder compiles them.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.fidelity import Status, check_fidelity
from dynamos.builder.units import compile_unit
from dynamos.errors import BuildError
from dynamos.lab.kallsyms import lab_symbol_table, read_lab_kallsyms
from dynamos.target.images import KernelText, kernel_text
from dynamos.target.source import KernelSource, prepare_source
from dynamos.target.symtab import SymbolTable, check_link_time, vmlinux_text_address

pytestmark = pytest.mark.lab


def say(message: str) -> None:
    print(f"fidelity: {message}", file=sys.stderr)


@pytest.fixture(scope="module")
def symtab(target) -> SymbolTable:
    return lab_symbol_table(target, progress=say)


@pytest.fixture(scope="module")
def text(target) -> KernelText:
    return kernel_text(target)


@pytest.fixture(scope="module")
def source(target) -> KernelSource:
    return prepare_source(target, progress=say)


@pytest.fixture(scope="module")
def objects(source, tmp_path_factory) -> Path:
    """Original objects of a few units, compiled once for the module."""
    out = tmp_path_factory.mktemp("fidelity")
    for unit in ("fs/proc/cmdline.o", "fs/proc/version.o", "kernel/kallsyms.o"):
        compile_unit(source, unit, out / unit.replace("/", "_"), progress=say)
    return out


def test_nokaslr_lab_gives_link_time_symbols_like_the_cache(target, symtab) -> None:
    started = time.monotonic()
    fresh = SymbolTable.parse(read_lab_kallsyms(target, say))
    say(f"symbol table read from a fresh lab in {time.monotonic() - started:.1f} s")
    check_link_time(fresh, vmlinux_text_address(target), target.release)
    assert fresh.lookup("_text")[0].addr == 0xFFFFFFFF81000000
    # vmlinux's part is the same at every boot (module addresses are not).
    now = [(s.addr, s.type, s.name) for s in fresh.symbols if s.object == "vmlinux"]
    cached = [(s.addr, s.type, s.name) for s in symtab.symbols if s.object == "vmlinux"]
    first = next((i for i, (a, b) in enumerate(zip(now, cached, strict=False)) if a != b), None)
    assert now == cached, (f"{len(now)} vmlinux symbols now, {len(cached)} cached; first difference at line "
                           f"{first}: {now[first] if first is not None else None} vs "
                           f"{cached[first] if first is not None else None}")


def test_cmdline_proc_show_matches_the_shipped_text(target, symtab, text, objects) -> None:
    report = check_fidelity(objects / "fs_proc_cmdline.o", target, symtab, text=text)
    assert report.ok and not report.ambiguous, report.summary()
    show = report.functions["cmdline_proc_show"]
    assert show.status is Status.MATCHED and show.sympos == 1
    assert show.addr == symtab.lookup("cmdline_proc_show")[0].addr
    match = show.match
    # Every relocation is verified against the symbol table: the calls, saved_command_line, fentry.
    assert match.verified == 5 and match.comparison.masked == 0, show.describe()


def test_version_unit_matches(target, symtab, text, objects) -> None:
    report = check_fidelity(objects / "fs_proc_version.o", target, symtab, text=text)
    assert report.ok and report.resolved.get("version_proc_show") == 1, report.summary()


def test_a_flipped_byte_is_a_mismatch_naming_the_function(target, symtab, text, objects) -> None:
    data = bytearray((objects / "fs_proc_cmdline.o").read_bytes())
    section = ELFFile(io.BytesIO(bytes(data))).get_section_by_name(".text.cmdline_proc_show")
    data[section["sh_offset"] + 5] ^= 0x01  # push %rbx -> push %rbp: no relocation covers it
    report = check_fidelity(bytes(data), target, symtab, text=text)
    assert [f.name for f in report.mismatches] == ["cmdline_proc_show"]
    assert report.mismatches[0].closest.comparison.first_difference == 5
    with pytest.raises(BuildError, match="cmdline_proc_show") as caught:
        report.raise_on_mismatch()
    assert "wrong source, config or compiler" in str(caught.value)


def test_static_functions_with_twins_resolve_to_one_sympos(target, symtab, text, objects) -> None:
    """kernel/kallsyms.c's seq_file callbacks (s_show, s_start...) have same-named statics elsewhere."""
    report = check_fidelity(objects / "kernel_kallsyms.o", target, symtab, text=text)
    assert report.ok and not report.ambiguous, report.summary()
    twins = {name: f for name, f in report.functions.items() if len(f.candidates) > 1}
    assert {"s_show", "s_start", "s_next", "s_stop"} <= set(twins)
    # Independent of the check: this file's .text functions sit together in the kernel's text, so
    # the resolved copy lies among those whose names are unique, and no other copy does.
    unique = [f.addr for f in report.functions.values()
              if len(f.candidates) == 1 and f.addr and f.section.startswith(".text.")
              and not f.section.startswith((".text.unlikely.", ".text.hot."))]
    low, high = min(unique) - 0x1000, max(unique) + 0x1000
    for name, f in twins.items():
        assert f.status is Status.MATCHED and f.sympos == report.resolved[name]
        inside = [c.sympos for c in f.candidates if low <= c.addr <= high]
        assert inside == [f.sympos], f"{name}: {f.describe()}"


def test_a_string_the_kernel_does_not_have_is_a_mismatch(target, symtab, text, source, tmp_path) -> None:
    """Only a string literal differs: the code is the same, the check follows the reference."""
    original = (source.tree / "fs/proc/loadavg.c").read_text()
    changed = original.replace('%u/%d %d\\n"', '%u/%d %d!"')
    assert changed != original
    unit = compile_unit(source, "fs/proc/loadavg.c", tmp_path / "loadavg.o", text=changed.encode(), progress=say)
    report = check_fidelity(unit.object_path, target, symtab, text=text)
    assert [f.name for f in report.mismatches] == ["loadavg_proc_show"]
    assert "constants that differ" in report.mismatches[0].describe()
