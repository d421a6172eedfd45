"""Fidelity check: do the compiled originals byte-match the target kernel's text?

Ksplice's "run-pre" idea. A single-file build is only faithful when compiling the original file
with the target's source, config and compiler reproduces the code the target runs. So every
function of the compiled original is compared with the kernel's bytes at its address (link-time
addresses from the lab's symbol table, bytes from the vmlinux file): a difference stops the build
naming the function, before anything is generated or loaded.

Relocation fields are what the linker filled in, so they are not compared with the object's
zeros; where the referenced symbol's kernel address is known, the field is compared with the value
the linker must have written ("verified"): a call that goes elsewhere is a difference too. An
address is known when its name is unique in the symbol table, or learnt from what already matched:
a matched function or data object places its own section, and its linked fields tell where this
file's static functions and data went (Ksplice's run-pre matching). References to string literals
(merged sections, which the linker lays out anew) are followed and the strings compared. The same
learning picks which of several same-named static functions (livepatch's ``sympos``) is this
file's, even where their code is identical: this file's callers and tables point at one of them.

What differs between the kernel's text and a faithful compile, measured on Debian's 6.1 vmlinux
over 53 translation units compiled with ``-ffunction-sections -fdata-sections`` (4,948 functions,
1.1 MB; of 46,000 relocation fields all but one were checked, 43,800 by value and 2,350 string
references by content; the 54 functions with same-named twins each resolved to one sympos):

- Nothing the kernel build rewrote after compiling. objtool's code edits (jump-label NOPs,
  ``--mcount``) run on each object, so the compiled original has them too; retpoline, return-thunk,
  fentry and static-call sites are plain linked calls and jumps in the file (the 5-byte
  ``call __fentry__`` included); alternatives, ftrace's NOPs and static-call patching happen at
  boot. (A comparison with the *running* text would have to mask those sites; this one reads the
  file.)
- Branch relaxation, from ``-ffunction-sections`` itself (SHORT_BRANCHES): the kernel compiles a
  file into one ``.text``, so the assembler shortens a jump to a nearby function of the same file
  to two bytes, moving the bytes after it and changing the displacement of branches across it; in
  a per-function section the jump keeps its four-byte form. 6 of 4,948 functions (tail calls such
  as ``bcmp`` -> ``memcmp``); both effects are recomputed, not masked. An object compiled without
  ``-ffunction-sections`` has none.
- ``__weak`` definitions another file overrides (37): in the object, absent from the kernel's
  table; reported as overridden, not as a difference.

The package: ``unit.py`` reads the compiled unit (through the one ELF model), ``compare.py`` is the
pure masked comparison and branch relaxation, ``check.py`` the matching, ``report.py`` the findings.
"""

from dynamos.builder.fidelity.check import check_fidelity
from dynamos.builder.fidelity.compare import (
    Comparison,
    ItemCheck,
    check_item,
    compare_masked,
    retarget_branches,
    short_branch,
)
from dynamos.builder.fidelity.report import CandidateCheck, FidelityReport, FunctionCheck, Status
from dynamos.builder.fidelity.unit import FieldReloc, ObjectItem, ObjectUnit, read_object_unit

__all__ = [
    "CandidateCheck", "Comparison", "FidelityReport", "FieldReloc", "FunctionCheck", "ItemCheck", "ObjectItem",
    "ObjectUnit", "Status", "check_fidelity", "check_item", "compare_masked", "read_object_unit",
    "retarget_branches", "short_branch",
]
