"""The one table of special sections: how the object diff treats each, and how extraction carries it.

One row per section pattern (fnmatch on the name; the first matching row decides). Sections that
match no row are code (executable), merged constants, data (.data*, .bss*, .rodata*) or, when
allocated and unknown, refused by the diff on any change (DEFAULT_RULE) and left behind by
extraction. Entry sizes come from the architecture (``x86_64.TABLE_LAYOUTS``), never from here.

The diff and extraction read the same row, so they cannot disagree: every table the diff compares
per function is one whose entries extraction carries (a unit test holds the two to that).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase

from dynamos.builder.elf.x86_64 import TABLE_LAYOUTS, TableLayout


class Handling(Enum):
    """How the object diff treats a special section."""

    IGNORE = "ignore"  # derived per function: rebuilt for the update module, or harmless to leave out
    PER_FUNCTION = "per-function"  # a table whose entries point into functions; entries travel with them
    BOOT_ONLY = "boot-only"  # __init/__exit code and data: used only at boot, load or unload
    REFUSE_CHANGE = "refuse-change"  # a table dynamos does not handle yet: any change refuses the update
    DIRECTIVE = "directive"  # an instruction to the patch builder (compatibility macros): read, never diffed


class Carry(Enum):
    """How extraction carries a special section into the cut-out object."""

    ENTRIES = "entries"  # a per-function table: the entries about kept code travel, the others are dropped
    PARALLEL = "parallel"  # entries travel with the entries of the same index of another table (``driver``)
    PIECES = "pieces"  # code outside any function, in pieces the kept code or kept entries use: copied
    # whole, and only the used pieces keep their relocations (the others never run in the update)
    REFUSE = "refuse"  # entries about kept code stop the extraction (``carry_why`` says why)
    DROP = "drop"  # left behind


@dataclass(frozen=True)
class SectionRule:
    pattern: str  # fnmatch pattern on the section name
    handling: Handling  # what the object diff does with it
    why: str  # what the section is and why it is treated so (diff messages quote it)
    carry: Carry = Carry.DROP  # what extraction does with it
    driver: str | None = None  # Carry.PARALLEL: the table whose kept entries decide
    carry_why: str = ""  # Carry.REFUSE: the reason extraction gives
    key: str = ""  # what an entry's key is (the layout says where): a key of a module cannot be carried
    # The kernel copies this code into the module's own as the module loads (apply_alternatives, from
    # module_finalize): a symbol of a module it uses, which livepatch resolves only later, cannot be carried.
    copied_at_load: bool = False
    directive: str = ""  # Handling.DIRECTIVE: what the patch builder does with it (builder/compat.py)

    @property
    def layout(self) -> TableLayout | None:
        """The architecture's entry layout, for tables of fixed-size entries."""
        return TABLE_LAYOUTS.get(self.pattern)

    @property
    def entry_size(self) -> int:
        return self.layout.entry_size if self.layout else 0


STATIC_KEY, STATIC_CALL = "static key", "static call"  # the ``key`` of the jump-label and static-call rows
_I, _P, _B, _R = Handling.IGNORE, Handling.PER_FUNCTION, Handling.BOOT_ONLY, Handling.REFUSE_CHANGE
_D = Handling.DIRECTIVE
_ENTRIES = Carry.ENTRIES

SECTION_RULES: tuple[SectionRule, ...] = (
    SectionRule("__mcount_loc", _I, "fentry call sites; recorded again for the update module", _ENTRIES),
    SectionRule("__patchable_function_entries", _I, "fentry sites; recorded again for the update"),
    SectionRule(".orc_unwind", _I, "ORC unwind data; objtool writes it again for the update module",
                Carry.PARALLEL, driver=".orc_unwind_ip"),
    SectionRule(".orc_unwind_ip", _I, "ORC unwind data; objtool writes it again for the update module", _ENTRIES),
    SectionRule(".orc_header", _I, "ORC format header; written again for the update module"),
    SectionRule(".return_sites", _I, "return-thunk sites; an unlisted site keeps the thunk (correct)", _ENTRIES),
    SectionRule(".retpoline_sites", _I, "retpoline sites; an unlisted site keeps the thunk (correct)", _ENTRIES),
    SectionRule(".call_sites", _I, "call-depth tracking sites; an unlisted site is still correct", _ENTRIES),
    SectionRule(".ibt_endbr_seal", _I, "ENDBR sealing list; only an optimisation", _ENTRIES),
    SectionRule(".static_call_sites", _I, "static-call sites; an unlisted site calls the trampoline", _ENTRIES,
                key=STATIC_CALL),
    SectionRule(".smp_locks", _I, "LOCK prefixes kept for UP patching; leaving them is correct", _ENTRIES),
    # The module loader applies a module's alternatives as for any module (module_finalize): the
    # replacements an update's entries name, and the static_cpu_has() tests its code jumps to before
    # that (they jump back into the update's copy), travel with the code.
    SectionRule(".altinstr_replacement", _I, "replacement code; compared via .altinstructions entries",
                Carry.PIECES, copied_at_load=True),
    SectionRule(".altinstr_aux", _I, "static_cpu_has() run-time tests; compared via the code jumping to them",
                Carry.PIECES),
    SectionRule(".discard.*", _I, "objtool annotations, dropped at link time"),
    SectionRule(".note.*", _I, "notes (build id, GNU properties), not code or data"),
    SectionRule("__jump_table", _P, "static-key sites (struct jump_entry)", _ENTRIES, key=STATIC_KEY),
    SectionRule(".altinstructions", _P, "CPU-feature alternatives (struct alt_instr)", _ENTRIES),
    SectionRule("__bug_table", _P, "BUG/WARN sites (struct bug_entry)", _ENTRIES),
    SectionRule("__ex_table", _P, "exception fixups (struct exception_table_entry)", _ENTRIES),
    SectionRule(".parainstructions", _P, "paravirt sites (struct paravirt_patch_site)", _ENTRIES),
    SectionRule(".init.*", _B, "__init: runs only at boot or module load and is freed afterwards"),
    SectionRule(".exit.*", _B, "__exit: runs only at module unload, or never when built in"),
    SectionRule(".head.text", _B, "early boot code: runs once before the kernel is up"),
    SectionRule(".initcall*", _R, "the initcall list is read only at boot"),
    # An export the patched file adds (or drops) is not carried: the running kernel's modules were
    # built against its exports as they are, and the update's own code reaches any function of the
    # kernel, exported or not, through livepatch (builder/resolution.py).
    SectionRule("__ksymtab*", _I, "exported symbols; an added or removed export is not carried"),
    SectionRule("___ksymtab*", _I, "exported symbols; an added or removed export is not carried"),
    SectionRule("__kcrctab*", _I, "export CRCs; an added or removed export is not carried"),
    SectionRule("__param", _R, "module and boot parameters"),
    SectionRule(".modinfo", _R, "module metadata"),
    SectionRule("__tracepoint*", _R, "tracepoint definitions"),
    SectionRule("_ftrace_events", _R, "trace event definitions"),
    SectionRule("__syscalls_metadata", _R, "syscall trace metadata"),
    # Written by the compatibility macros (runtime/compat: kpatch-macros.h, linux/livepatch_helpers.h).
    SectionRule(".dynamos.callbacks.pre_patch", _D, "a pointer to a pre_patch callback (KPATCH_/KLP_ macro)",
                directive="pre_patch"),
    SectionRule(".dynamos.callbacks.post_patch", _D, "a pointer to a post_patch callback (KPATCH_/KLP_ macro)",
                directive="post_patch"),
    SectionRule(".dynamos.callbacks.pre_unpatch", _D, "a pointer to a pre_unpatch callback (KPATCH_/KLP_ macro)",
                directive="pre_unpatch"),
    SectionRule(".dynamos.callbacks.post_unpatch", _D, "a pointer to a post_unpatch callback (KPATCH_/KLP_ macro)",
                directive="post_unpatch"),
    SectionRule(".dynamos.ignore.functions", _D, "pointers to functions whose changes the update leaves out "
                "(KPATCH_IGNORE_FUNCTION)", directive="ignore-function"),
    SectionRule(".dynamos.ignore.sections", _D, "names of sections whose changes the update leaves out "
                "(KPATCH_IGNORE_SECTION)", directive="ignore-section"),
)
DEFAULT_RULE = SectionRule("*", Handling.REFUSE_CHANGE, "a special section dynamos does not handle yet")

# The unwinder's two parallel tables (an IP, and the state from it on): code an update adds to a
# function needs an entry in both (builder/modkeys.py).
UNWIND_IPS, UNWIND_STATES = ".orc_unwind_ip", ".orc_unwind"
# Section-name prefixes of ordinary data, and file-local writable data that is, like a constant, owned
# by the functions that use it: when it changes, the update carries a new copy together with those
# functions (pr_debug descriptors).
DATA_PREFIXES = (".data", ".bss", ".rodata", ".tdata", ".tbss", ".ref.data", ".ref.rodata")
CARRIED_WRITABLE_SECTIONS = ("__dyndbg",)


def section_rule(name: str) -> SectionRule | None:
    """The special-section row for ``name``, or None for ordinary code, data and constants."""
    for rule in SECTION_RULES:
        if fnmatchcase(name, rule.pattern):
            return rule
    return None


def carried(name: str) -> Carry:
    """How extraction carries section ``name``: a table, a copy, a refusal, or not at all."""
    rule = section_rule(name)
    return rule.carry if rule is not None else Carry.DROP
