"""The one character set every name from outside (a manifest, a command line, a patch) must keep.

Names end up as path components: ``/sys/kernel/livepatch/<update>``, ``/run/dynamos/updates/
<update>.json``, ``/sys/module/<update>/dynamos/<function>``. A name that slipped a ``/`` or a
``..`` through would point dynamos at a file it never meant to write (``revert ../debug/kprobes``
once wrote 0 to the kprobes switch). One rule, applied where a name enters, closes that for every
path built from it; the finer rules of each kind of name (rules.py) come on top.
"""

from __future__ import annotations

import re

from dynamos.errors import DynamosError, RefusedError

# Letters, digits and '_' start a name; '.', ',', ':' and '-' may follow (gcc clones "f.isra.0",
# directory names "f,2" and "mod:f", update names "fix-x"). No '/', no leading '.': never a path.
NAME_CHARS = "A-Z a-z 0-9 _ . , : -"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,:-]*$")
MAX_NAME_CHARS = 511  # KSYM_NAME_LEN less the NUL: no kernel name is longer


def name_refusal(value: object) -> str | None:
    """Why ``value`` cannot be a name dynamos builds a path from, or None."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long (at most {MAX_NAME_CHARS})"
    if not _NAME_RE.match(value) or ".." in value:
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9_.,:-]", c)})
        found = f" (found {''.join(bad)!r})" if bad else ""
        return f"may only hold {NAME_CHARS}, start with a letter, digit or '_' and hold no '..'{found}"
    return None


def checked_name(value: object, what: str, origin: str, error: type[DynamosError] = RefusedError) -> str:
    """``value`` if it is a safe name; else ``error`` naming the value, what it is and where it came from."""
    problem = name_refusal(value)
    if problem:
        raise error(f"{what} {value!r} (from {origin}) {problem}")
    assert isinstance(value, str)
    return value
