"""What the fidelity check found, per function and for the unit, in words for people and JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from dynamos.builder.fidelity.compare import Comparison
from dynamos.builder.refusals import FIDELITY
from dynamos.errors import BuildError


class Status(Enum):
    MATCHED = "matched"  # exactly one same-named kernel symbol has this code
    MISMATCH = "mismatch"  # same-named symbols exist, none has this code
    AMBIGUOUS = "ambiguous"  # several same-named symbols have this code and nothing tells them apart
    OVERRIDDEN = "overridden"  # a __weak definition the kernel replaced by a strong one: never runs
    ABSENT = "absent"  # no code symbol of this name in the kernel (discarded, or another object)


@dataclass(frozen=True)
class CandidateCheck:
    """One function compared with one same-named kernel symbol."""

    addr: int
    sympos: int
    type: str
    comparison: Comparison
    verified: int = 0  # relocation fields whose linked value was checked
    wrong_relocs: tuple[str, ...] = ()  # relocation fields that point elsewhere (offset and label)
    relaxed: int = 0  # branches the kernel holds in their short form
    wrong_constants: tuple[str, ...] = ()  # strings or constants the kernel's code uses that differ
    elsewhere: bool = False  # this file's copy is known to be at another address

    @property
    def equal(self) -> bool:
        return self.comparison.equal and not self.wrong_constants and not self.elsewhere


@dataclass(frozen=True)
class FunctionCheck:
    name: str
    size: int
    section: str
    status: Status
    candidates: tuple[CandidateCheck, ...]

    @property
    def match(self) -> CandidateCheck | None:
        hits = [c for c in self.candidates if c.equal]
        return hits[0] if len(hits) == 1 else None

    @property
    def sympos(self) -> int | None:
        return self.match.sympos if self.match else None

    @property
    def addr(self) -> int | None:
        return self.match.addr if self.match else None

    @property
    def closest(self) -> CandidateCheck | None:
        return min(self.candidates, key=lambda c: (c.elsewhere, c.comparison.differing), default=None)

    def describe(self) -> str:
        """One line for people: where the function is, or how it differs."""
        if self.match is not None:
            c = self.match
            return (f"{self.name}: matches sympos {c.sympos} at {c.addr:#x} ({c.comparison.compared} bytes "
                    f"compared, {c.comparison.masked} masked, {c.verified} relocations verified)")
        return f"{self.name}: {_STATUS_TEXT[self.status](self)}"


def _ambiguous_text(f: FunctionCheck) -> str:
    where = ", ".join(f"sympos {c.sympos} at {c.addr:#x}" for c in f.candidates if c.equal)
    return f"ambiguous, the same code is at {where}"


def _mismatch_text(f: FunctionCheck) -> str:
    c = f.closest
    assert c is not None
    text = (f"differs from the kernel's (closest: sympos {c.sympos} at {c.addr:#x}): "
            f"{c.comparison.differing} of {c.comparison.compared} compared bytes differ")
    if c.comparison.first_difference is not None:
        text += f", first at +{c.comparison.first_difference:#x}"
    if c.wrong_relocs:
        text += "; relocations pointing elsewhere: " + ", ".join(c.wrong_relocs[:3])
    if c.wrong_constants:
        text += "; constants that differ: " + ", ".join(c.wrong_constants[:3])
    if c.elsewhere:
        text += "; this file's references place its copy at another address"
    return text


_STATUS_TEXT: dict[Status, Callable[[FunctionCheck], str]] = {
    Status.MATCHED: lambda f: "matched",
    Status.AMBIGUOUS: _ambiguous_text,
    Status.MISMATCH: _mismatch_text,
    Status.OVERRIDDEN: lambda f: "a __weak definition another file overrides (the kernel never runs it)",
    Status.ABSENT: lambda f: "not in the kernel's symbol table (discarded, or not built into vmlinux)",
}


@dataclass
class FidelityReport:
    unit: str
    against: str  # "kernel <release>", or the module the unit was compared with
    functions: dict[str, FunctionCheck] = field(default_factory=dict)
    passes: int = 0  # resolution passes until nothing more was learnt
    learnt: int = 0  # addresses learnt from matched functions and data
    # The unit's named data (static variables, gcc's numbered locals) -> this file's copy's address
    data_addresses: dict[str, int] = field(default_factory=dict)

    def _with(self, status: Status) -> list[FunctionCheck]:
        return [f for f in self.functions.values() if f.status is status]

    @property
    def mismatches(self) -> list[FunctionCheck]:
        return self._with(Status.MISMATCH)

    @property
    def ambiguous(self) -> list[FunctionCheck]:
        return self._with(Status.AMBIGUOUS)

    @property
    def absent(self) -> list[FunctionCheck]:
        return self._with(Status.ABSENT)

    @property
    def overridden(self) -> list[FunctionCheck]:
        return self._with(Status.OVERRIDDEN)

    @property
    def matched(self) -> list[FunctionCheck]:
        return self._with(Status.MATCHED)

    @property
    def resolved(self) -> dict[str, int]:
        """Function name -> livepatch sympos of the kernel symbol that is this file's."""
        return {f.name: f.sympos for f in self.matched if f.sympos is not None}

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        counts = ", ".join(f"{len(self._with(s))} {s.value}" for s in Status)
        return f"{self.unit} against {self.against}: {counts}"

    def to_json(self) -> dict:
        return {
            "unit": self.unit, "against": self.against, "ok": self.ok, "resolved": self.resolved,
            "functions": {f.name: {"status": f.status.value, "sympos": f.sympos, "addr": f.addr,
                                   "candidates": len(f.candidates), "detail": f.describe()}
                          for f in self.functions.values()},
        }

    def raise_on_mismatch(self) -> None:
        """Stop a build: the compiled original is not what the target runs."""
        if self.ok:
            return
        lines = [f.describe() for f in self.mismatches]
        raise BuildError(f"fidelity check failed: {len(lines)} function(s) of {self.unit} differ from "
                         f"{self.against} (wrong source, config or compiler):\n  " + "\n  ".join(lines[:20]),
                         code=FIDELITY)
