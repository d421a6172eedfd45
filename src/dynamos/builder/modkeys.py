"""Jump labels and static calls on keys of a module, in a changed function: rewritten, or refused.

Why they cannot travel as they are (kernel 6.1): the module loader hands a module's ``__jump_table``
and ``.static_call_sites`` to jump_label_add_module and static_call_add_module from the
MODULE_STATE_COMING notifier, before the module's init runs (kernel/module/main.c,
prepare_coming_module). A livepatch module writes the relocations to another module's symbols
(``.klp.rela.<module>.*``) only from its init (klp_enable_patch -> klp_init_object_loaded), or
later, when that module loads. An entry whose key is such a symbol would be read with the key
unwritten: the kernel would take the entry for a key of its own or of some other object.

So, before the tables are written, each such entry is taken out of its table and its site made
correct without one:

* A static call site (``call __SCT__name``, kernel/static_call_inline.c) left out of the table keeps
  calling the trampoline, which __static_call_update always rewrites (arch_static_call_transform
  on the trampoline, then on the sites it knows): the same function is called, one jump later.
* A jump label on a tracepoint's key (``trace_foo()`` is ``if (static_key_false(&__tracepoint_foo.key))
  __DO_TRACE(...)``, include/linux/tracepoint.h) becomes an unconditional jump to its "enabled"
  code. That code reads ``__tracepoint_foo.funcs`` and calls the probes only when there are some;
  tracepoint_add_func publishes funcs before it enables the key, and tracepoint_remove_func disables
  the key before it clears funcs (kernel/tracepoint.c), so always taking the branch behaves as a
  site that saw the key at another moment, which any caller of the tracepoint already allows. The
  cost is a load and a preempt_disable/enable per call while the tracepoint is off. A module has
  no ``_rcuidle`` tracepoints (they are not declared under MODULE), whose enabled code warns in NMI.
* Any other key of a module (a plain ``static_branch_*()``), at a 5-byte site, becomes a jump to a
  test of the key appended to the function (``_test_of_key``): it branches exactly when the kernel
  would have patched a jmp in, reading the key through a livepatch relocation. A 2-byte site has no
  room for that jump and is refused, naming the function and the key, except for the most common
  one, a ``pr_debug()`` (``own_descriptors``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dynamos.abi import VMLINUX
from dynamos.builder.elf import STT_FUNC, STT_OBJECT, Rela, RelocatableElf
from dynamos.builder.elf.sections import SECTION_RULES, STATIC_CALL, STATIC_KEY, UNWIND_IPS, UNWIND_STATES
from dynamos.builder.elf.x86_64 import TABLE_LAYOUTS
from dynamos.builder.klp import KlpSymbol
from dynamos.errors import BuildError

R_X86_64_PC32 = 2
TRACEPOINT_PREFIX = "__tracepoint_"
TRACEPOINT_KEY_OFFSET = 8  # struct tracepoint { const char *name; struct static_key key; ... } (6.1)
JUMP_ENTRY_BRANCH = 1  # low bits of struct jump_entry's key: branch (1), and init / objtool's NOP mark (2)
JUMP_ENTRY_FLAGS = 3
# What a jump-label site holds in an object objtool has seen: its NOP, or the jmp it left (HAVE_JUMP_LABEL_HACK).
NOP2, NOP5 = b"\x66\x90", b"\x0f\x1f\x44\x00\x00"
JMP8, JMP32 = 0xEB, 0xE9
JG, JLE, INT3 = b"\x0f\x8f", b"\x0f\x8e", b"\xcc"  # jcc rel32; int3 stops straight-line speculation


@dataclass(frozen=True)
class KeySite:
    """One rewritten or dropped table entry, for ``--explain`` and tests."""

    table: str  # __jump_table or .static_call_sites
    function: str
    key: str  # the key's symbol (a tracepoint, a static call key)
    object: str  # the module defining it
    how: str  # what became of the site


DESCRIPTORS = "__dyndbg"  # struct _ddebug of every pr_debug/dev_dbg call site: its key is the site's switch


def own_descriptors(obj: RelocatableElf, relas_of: dict[int, int], keep: set[int],
                    resolve: Callable[[str, bool], KlpSymbol | None]) -> list[KeySite]:
    """The 2-byte jump-label sites of kept functions keyed on a pr_debug descriptor that is the
    running module's (no room to test that key, see above): for them the unit's ``__dyndbg``
    section is to be kept (``DESCRIPTORS``).

    The update then carries its own copy of the unit's descriptors instead: the module loader
    registers them with dynamic debug under the update's name and their keys are the update's own,
    which its ``__jump_table`` may name. The new code's messages are switched by ``file``, ``func``
    or ``module <update>`` queries, not ``module <patched module>`` (its table is another)."""
    table, descriptors = obj.section_index("__jump_table"), obj.section_index(DESCRIPTORS)
    if table is None or descriptors is None or table not in relas_of:
        return []
    layout = TABLE_LAYOUTS["__jump_table"]
    named = {(sym.value, i) for i, sym in enumerate(obj.symbols)
             if sym.shndx == descriptors and sym.type == STT_OBJECT and sym.name}
    sites: list[KeySite] = []
    for fields in _entries(obj.relocations(relas_of[table]), layout.entry_size).values():
        code, key = fields.get(0), fields.get(layout.key_offset)
        if code is None or key is None or obj.symbol_section(key.sym) != descriptors:
            continue
        section, site = _place(obj, code)
        data = obj.sections[section].data
        if section not in keep or not (data[site:site + 2] == NOP2 or data[site] == JMP8):
            continue
        at = obj.symbols[key.sym].value + (key.addend & ~JUMP_ENTRY_FLAGS)
        name = obj.symbols[max((i for value, i in named if value <= at), default=key.sym,
                               key=lambda i: obj.symbols[i].value)].name
        try:
            where = resolve(name, True)
        except BuildError:
            continue  # refused anyway when its code is linked, naming it
        if where is not None and where.object != VMLINUX:
            sites.append(KeySite("__jump_table", _function_at(obj, section, site), name, where.object,
                                 f"2-byte pr_debug site at {site:#x}: the update carries its own copy of the "
                                 f"unit's descriptors (switched by file, func or module of the update)"))
    return sites


def carry_module_keys(obj: RelocatableElf, relas_of: dict[int, int], klp: dict[str, KlpSymbol]) -> list[KeySite]:
    """Take every entry keyed on a module's symbol out of ``__jump_table`` and ``.static_call_sites``,
    rewriting its site so it needs no entry; refuse the ones that cannot be (module docstring)."""
    def module_symbol(sym: int) -> KlpSymbol | None:
        used = klp.get(obj.symbols[sym].name)
        return used if used is not None and used.object != VMLINUX else None

    done: list[KeySite] = []
    rewrites = {STATIC_KEY: _jump_label, STATIC_CALL: _static_call}
    for rule in SECTION_RULES:
        rewrite = rewrites.get(rule.key)
        index = obj.section_index(rule.pattern) if rewrite is not None else None
        if rewrite is None or rule.layout is None or index is None or index not in relas_of:
            continue
        layout = rule.layout
        size, key_at = layout.entry_size, layout.key_offset
        dropped = set()
        for entry, fields in sorted(_entries(obj.relocations(relas_of[index]), size).items()):
            key = fields.get(key_at)
            used = module_symbol(key.sym) if key is not None else None
            if used is None:
                continue
            done.append(rewrite(obj, rule.pattern, relas_of, fields, used, key.addend))
            dropped.add(entry)
        if dropped:
            _drop_entries(obj, index, relas_of[index], size, dropped)
    return done


def _static_call(obj: RelocatableElf, table: str, relas_of: dict[int, int], fields: dict[int, Rela], used: KlpSymbol,
                 addend: int) -> KeySite:
    site = fields[0]
    section, offset = _place(obj, site)
    return KeySite(table, _function_at(obj, section, offset), used.name, used.object,
                   "left out: the site calls the static call's trampoline")


def _jump_label(obj: RelocatableElf, table: str, relas_of: dict[int, int], fields: dict[int, Rela], used: KlpSymbol,
                addend: int) -> KeySite:
    code, target = fields.get(0), fields.get(4)
    if code is None or target is None:
        raise BuildError(f"{table}: an entry on static key {used.name} of module {used.object} names no "
                         f"code or no target")
    section, site = _place(obj, code)
    function = _function_at(obj, section, site)
    tracepoint = used.name.startswith(TRACEPOINT_PREFIX) and addend & ~JUMP_ENTRY_FLAGS == TRACEPOINT_KEY_OFFSET
    data = bytearray(obj.sections[section].data)
    length = 2 if bytes(data[site:site + 2]) == NOP2 or data[site] == JMP8 else 5
    if length == 5 and not (bytes(data[site:site + 5]) == NOP5 or data[site] == JMP32):
        raise BuildError(f"{function}: the jump label on {used.name} of module {used.object} at "
                         f"{obj.sections[section].name}+{site:#x} is neither a jump-label NOP nor a jmp")
    if not tracepoint or addend & JUMP_ENTRY_BRANCH:
        if length == 5:
            return _test_of_key(obj, table, relas_of, fields, used, addend, function)
        raise BuildError(
            f"{function}: a jump label on static key {used.name} of module {used.object} cannot be carried: the "
            f"kernel reads a livepatch module's __jump_table before livepatch resolves that module's symbols, and "
            f"this site is 2 bytes long, too short for a jump to a test of the key (only a tracepoint's key, whose "
            f"code checks for probes itself, is rewritten in a 2-byte site)")
    target_section, goal = _place(obj, target)
    rela_index = relas_of.get(section)
    relas = [r for r in obj.relocations(rela_index) if not site <= r.offset < site + length] \
        if rela_index is not None else []
    if target_section == section:
        disp = goal - (site + length)
        if length == 2 and not -128 <= disp <= 127:
            raise BuildError(f"{function}: the 2-byte jump label on {used.name} at {site:#x} cannot reach {goal:#x}")
        data[site:site + length] = bytes([JMP8, disp & 0xFF]) if length == 2 else \
            bytes([JMP32]) + (disp & 0xFFFFFFFF).to_bytes(4, "little")
    elif length == 5 and rela_index is not None:
        data[site:site + 5] = bytes([JMP32, 0, 0, 0, 0])
        relas.append(Rela(site + 1, target.sym, R_X86_64_PC32, target.addend - 4))
    else:
        raise BuildError(f"{function}: the jump label on {used.name} at {site:#x} jumps to another section "
                         f"({obj.sections[target_section].name}) from a site too small to say so")
    obj.sections[section].data = bytes(data)
    if rela_index is not None:
        obj.set_relocations(rela_index, sorted(relas, key=lambda r: r.offset))
    return KeySite(table, function, used.name, used.object,
                   f"always jumps to the tracepoint's code ({length}-byte site at {site:#x})")


def _test_of_key(obj: RelocatableElf, table: str, relas_of: dict[int, int], fields: dict[int, Rela], used: KlpSymbol,
                 addend: int, function: str) -> KeySite:
    """A 5-byte site becomes a jump to a test of the key appended to the function's section:
    ``cmpl $0, key.enabled(%rip); jg/jle target; jmp site+5``. It jumps to the target exactly when
    the kernel would have written a jmp there: ``static_key_enabled(key) ^ branch``
    (jump_label_type, kernel/jump_label.c; enabled is ``atomic_read(&key->enabled) > 0``). The key's
    address is a livepatch relocation of the code, written before the module's code can run. The
    test leaves the stack as it is, so it unwinds with the site's ORC state (copied for it)."""
    code, target, key = fields[0], fields[4], fields[8]
    section, site = _place(obj, code)
    target_section, goal = _place(obj, target)
    rela_index = relas_of.get(section)
    if rela_index is None:
        raise BuildError(f"{function}: section {obj.sections[section].name} has no relocations to add the test of "
                         f"static key {used.name} of module {used.object} to")
    sec = obj.sections[section]
    data = bytearray(sec.data)
    old_end = len(data)
    owner = [sym for sym in obj.symbols if sym.type == STT_FUNC and sym.shndx == section
             and sym.value <= site < sym.value + sym.size]
    if len(owner) != 1 or owner[0].value + owner[0].size != old_end:
        raise BuildError(f"{function}: the jump label on static key {used.name} of module {used.object} would become "
                         f"a test of the key after the function, but {sec.name} holds more than that function")
    stub = old_end
    relas = [r for r in obj.relocations(rela_index) if not site <= r.offset < site + 5]
    data[site:site + 5] = bytes([JMP32]) + ((stub - (site + 5)) & 0xFFFFFFFF).to_bytes(4, "little")
    # cmpl $0x0, disp32(%rip): 83 3d disp32 00; the field is followed by the 1-byte immediate.
    data += b"\x83\x3d\0\0\0\0\0"
    relas.append(Rela(stub + 2, key.sym, R_X86_64_PC32, (key.addend & ~JUMP_ENTRY_FLAGS) - 5))
    jcc = len(data)
    data += (JLE if addend & JUMP_ENTRY_BRANCH else JG) + b"\0\0\0\0"
    if target_section == section:
        data[jcc + 2:jcc + 6] = ((goal - (jcc + 6)) & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        relas.append(Rela(jcc + 2, target.sym, R_X86_64_PC32, target.addend - 4))
    back = len(data)
    data += bytes([JMP32]) + ((site + 5 - (back + 5)) & 0xFFFFFFFF).to_bytes(4, "little") + INT3
    sec.data = bytes(data)
    obj.set_relocations(rela_index, sorted(relas, key=lambda r: r.offset))
    owner[0].size = len(data) - owner[0].value  # it ends after its tests (livepatch's stack check uses its size)
    _unwind_like(obj, relas_of, section, site, stub, old_end, len(data), code,
                 f"{function}: the jump label on static key {used.name} of module {used.object}")
    return KeySite(table, function, used.name, used.object,
                   f"jumps to a test of the key ({'jle' if addend & JUMP_ENTRY_BRANCH else 'jg'} target, at "
                   f"{obj.sections[section].name}+{stub:#x})")


def _unwind_like(obj: RelocatableElf, relas_of: dict[int, int], section: int, site: int, stub: int, old_end: int,
                 new_end: int, anchor: Rela, what: str) -> None:
    """ORC for the appended test: the state at the site, from ``stub`` on; the section's terminator
    (objtool puts one at the section's end) moves to the new end."""
    ips, states = obj.section_index(UNWIND_IPS), obj.section_index(UNWIND_STATES)
    ip_relas = obj.relocations(relas_of[ips]) if ips is not None and states is not None and ips in relas_of else []
    entry_size, ip_size = TABLE_LAYOUTS[UNWIND_STATES].entry_size, TABLE_LAYOUTS[UNWIND_IPS].entry_size
    here = [(obj.symbols[r.sym].value + r.addend, r) for r in ip_relas if obj.symbols[r.sym].shndx == section]
    before = [(ip, r) for ip, r in here if ip <= site]
    if not before:
        raise BuildError(f"{what} cannot be carried: it would become a test of the key, but no ORC entry of the "
                         f"object covers the site ({obj.sections[section].name}+{site:#x}) to unwind that test with")
    _, covering = max(before, key=lambda pair: pair[0])
    index = covering.offset // ip_size
    state = obj.sections[states].data[index * entry_size:(index + 1) * entry_size]
    for ip, r in here:
        if ip == old_end:
            r.addend += new_end - old_end
    count = len(obj.sections[ips].data) // ip_size
    ip_relas.append(Rela(count * ip_size, anchor.sym, R_X86_64_PC32, stub - obj.symbols[anchor.sym].value))
    obj.sections[ips].data += b"\0\0\0\0"
    obj.sections[states].data += state
    obj.set_relocations(relas_of[ips], ip_relas)


def _entries(relas: list[Rela], size: int) -> dict[int, dict[int, Rela]]:
    """A table's relocations by entry, then by the field's offset in the entry."""
    by_entry: dict[int, dict[int, Rela]] = {}
    for r in relas:
        by_entry.setdefault(r.offset // size, {})[r.offset % size] = r
    return by_entry


def _place(obj: RelocatableElf, r: Rela) -> tuple[int, int]:
    """(section, offset) a table's pc-relative field points at (``.long label - .``: S + A)."""
    sym = obj.symbols[r.sym]
    return sym.shndx, sym.value + r.addend


def _function_at(obj: RelocatableElf, section: int, offset: int) -> str:
    for sym in obj.symbols:
        if sym.type == STT_FUNC and sym.shndx == section and sym.value <= offset < sym.value + max(sym.size, 1):
            return sym.name
    return obj.sections[section].name


def _drop_entries(obj: RelocatableElf, index: int, rela_index: int, size: int, dropped: set[int]) -> None:
    sec = obj.sections[index]
    kept = [i for i in range(len(sec.data) // size) if i not in dropped]
    new_pos = {old: new for new, old in enumerate(kept)}
    sec.data = b"".join(sec.data[i * size:(i + 1) * size] for i in kept)
    obj.set_relocations(rela_index, [Rela(new_pos[r.offset // size] * size + r.offset % size, r.sym, r.type,
                                          r.addend)
                                     for r in obj.relocations(rela_index) if r.offset // size in new_pos])
