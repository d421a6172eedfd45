"""The one table of special sections: every row explains itself, the diff and extraction read it,
and no other module keeps a table of its own."""

from __future__ import annotations

import re
from pathlib import Path

import dynamos
from dynamos.builder.elf import TABLE_LAYOUTS
from dynamos.builder.elf.sections import SECTION_RULES, Carry, Handling, carried, section_rule

SRC = Path(dynamos.__file__).parent


def test_every_row_has_a_reason() -> None:
    for rule in SECTION_RULES:
        assert rule.why.strip(), rule.pattern
        if rule.carry is Carry.REFUSE:
            assert rule.carry_why.strip(), rule.pattern
    assert len({r.pattern for r in SECTION_RULES}) == len(SECTION_RULES), "one row per pattern"


def test_rows_are_complete() -> None:
    for rule in SECTION_RULES:
        if rule.handling is Handling.PER_FUNCTION or rule.carry in (Carry.ENTRIES, Carry.PARALLEL):
            assert rule.entry_size > 0, f"{rule.pattern}: no entry layout in x86_64.TABLE_LAYOUTS"
        if rule.carry is Carry.PARALLEL:
            assert rule.driver is not None and carried(rule.driver) is Carry.ENTRIES
        if rule.key:
            assert rule.layout is not None and rule.layout.key_offset is not None
    # Every architecture layout belongs to a row: no table sizes for sections the table does not know.
    assert set(TABLE_LAYOUTS) <= {r.pattern for r in SECTION_RULES}


def test_every_table_the_diff_compares_per_function_is_carried() -> None:
    """A table the diff compares per function is one extraction carries entry by entry: the diff
    and extraction never disagree (test_extract checks the entries really travel, table by table)."""
    for rule in SECTION_RULES:
        if rule.handling is Handling.PER_FUNCTION:
            assert rule.carry is Carry.ENTRIES, rule.pattern
    assert carried(".parainstructions") is Carry.ENTRIES


def test_lookups() -> None:
    assert carried("__bug_table") is Carry.ENTRIES and carried(".orc_unwind") is Carry.PARALLEL
    assert carried(".altinstr_replacement") is Carry.PIECES and carried(".altinstr_aux") is Carry.PIECES
    assert carried(".text.foo") is Carry.DROP and carried(".init.text") is Carry.DROP
    assert section_rule(".discard.reachable").handling is Handling.IGNORE


def test_no_other_module_keeps_a_table_of_special_sections() -> None:
    """Code may name the odd section it has logic for; a module naming several has grown a second table."""
    names = {r.pattern for r in SECTION_RULES if not any(c in r.pattern for c in "*?[")}
    pattern = re.compile(r"""["']([._][\w.]+)["']""")
    allowed = {SRC / "builder/elf/sections.py", SRC / "builder/elf/x86_64.py"}
    for path in sorted(SRC.rglob("*.py")):
        if path in allowed:
            continue
        mentioned = {m for m in pattern.findall(path.read_text()) if m in names}
        assert len(mentioned) <= 2, f"{path.relative_to(SRC)} names {sorted(mentioned)}: use elf/sections.py"
