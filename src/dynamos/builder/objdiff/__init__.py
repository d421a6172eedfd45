"""Function-level diff of two compiled translation units: the original and the patched file.

Both objects come from the same compiler and flags with ``-ffunction-sections -fdata-sections``,
so every function and data object sits at a known place and can be compared on its own. A
function is compared by its code with the relocation sites masked, and by its relocations with
the referenced symbol *normalised*: section-relative references become the symbol they land in,
string literals become their text, so a string or a function that merely moved in the object does
not look like a change. What cannot be live-patched is refused with a reason that names the symbol.

The result tells the module generator which functions the update must carry (changed and new),
which data it must place in the update module (new data, changed file-local constants), and which
special-section entries (static keys, alternatives, BUG/WARN sites, exception fixups) travel with
those functions.

Both objects must be compiled from the same path (``__FILE__`` is in BUG/WARN entries and strings)
and the patched file with its line numbers stabilised (``linemap``), or every WARN site moves.

normalise.py reads an object (through the one ELF model) into comparable items; diff.py compares two.
"""

from dynamos.builder.objdiff.align import align_statics
from dynamos.builder.objdiff.diff import Change, DiffRefusal, DiffResult, SpecialUse, diff_objects
from dynamos.builder.objdiff.normalise import DataItem, Function, ObjectInfo, Reloc, TableEntry, read_object

__all__ = ["Change", "DataItem", "DiffRefusal", "DiffResult", "Function", "ObjectInfo", "Reloc", "SpecialUse",
           "TableEntry", "align_statics", "diff_objects", "read_object"]
