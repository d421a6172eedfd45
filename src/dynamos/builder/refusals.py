"""Why a change is not carried, as a code: the vocabulary ``build --to`` reports and the builder sets.

The code is set where the refusal is decided (the object diff, the fidelity check, a compile) and
carried with it, so no one has to guess it back from the message. This module imports nothing of
the builder, so the diff, the patch builder and ``build --to`` all share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamos.errors import BuildError, DynamosError

# Issue 10's closed list of acceptable refusals ...
CHANGED_LAYOUT = "changed-layout"  # a type's layout or an existing variable's size changed
CHANGED_INITIALISER = "changed-initialiser"  # existing data with state got another initial value
INIT_EXIT = "init-exit"  # __init/__exit (boot-only) code or data
ASSEMBLY = "assembly"
BUILD_FILE = "build-file"  # Makefile, Kconfig, Kbuild
NOTRACE = "notrace"  # notrace/noinstr: livepatch cannot redirect the function
VDSO = "vdso"
HEADER_REACH = "header-reach"  # a header reaching more units than --max-units
ACCEPTED_CODES = (CHANGED_LAYOUT, CHANGED_INITIALISER, INIT_EXIT, ASSEMBLY, BUILD_FILE, NOTRACE, VDSO, HEADER_REACH)

# ... and the others, which count against the coverage target.
ADDED_FILE = "added-file"
REMOVED_FILE = "removed-file"
NOT_KERNEL_CODE = "not-kernel-code"
NOT_BUILT = "not-built"  # the target's config does not build the unit
NO_CODE_CHANGE = "no-code-change"
BUILD_FAILED = "build-failed"  # a compile of the original or patched unit failed
FIDELITY = "fidelity"  # the compiled original is not what the target runs, or cannot be matched to it
OTHER = "other"
OTHER_CODES = (ADDED_FILE, REMOVED_FILE, NOT_KERNEL_CODE, NOT_BUILT, NO_CODE_CHANGE, BUILD_FAILED, FIDELITY, OTHER)

CODES = ACCEPTED_CODES + OTHER_CODES


@dataclass(frozen=True)
class Refusal:
    """Why one unit was left out of a tolerant build: a code of ``CODES`` and the message."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def code_of(error: DynamosError) -> str:
    """The code a builder error carries; ``other`` for one raised without a code (no guessing
    from the message's words)."""
    return (error.code if isinstance(error, BuildError) else None) or OTHER


def first_unaccepted(codes: list[str]) -> str:
    """One code for several refusals of one unit: the first that counts against the target, so an
    acceptable refusal never hides one that is not; else the first."""
    return next((c for c in codes if c not in ACCEPTED_CODES), codes[0] if codes else OTHER)
