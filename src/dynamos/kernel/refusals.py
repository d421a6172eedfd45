"""Why dynamos refuses an update before touching the kernel: one row per reason.

A table rather than messages written where the checks are, so every refusal reads alike and
callers (the CLI's JSON, scripts, tests) can match on a stable code instead of on wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamos.errors import RefusedError

REFUSALS: dict[str, str] = {
    "not-root": "dynamos must run as root to change the kernel (effective uid is {euid})",
    "no-livepatch": "this kernel has no livepatch support: {path} is missing (CONFIG_LIVEPATCH)",
    "module-unsigned": "{why}: the kernel loads only signed modules, and the update's module is unsigned "
                       "(build it with a signer whose certificate the kernel trusts)",
    "module-key-unknown": "{why}: the update's module is signed, but its package does not say with which key, "
                          "so dynamos cannot check that the kernel trusts it (rebuild it with a signer)",
    "module-key-untrusted": "{why}: the update's module is signed by {signer} (key id {key_id}), a key none of "
                            "the kernel's keyrings holds (enrol its certificate: UEFI db or MOK)",
    "older-package": "{update}: this package was built {created}, before the newest one accepted for the same "
                     "update ({newest}); a superseded fix is not applied again unless asked (--allow-older)",
    "release": "the package is for kernel {package}, but the running kernel is {running}",
    "vermagic": "the module's vermagic is for kernel {vermagic}, but the running kernel is {running}",
    "already-loaded": "a livepatch named {name} is already loaded "
                      "(revert it first, or build the new update with replace = true)",
    "module-identity": "the manifest names the update's module {name}, but {problem}: the kernel would "
                       "register it under another name, which dynamos could neither watch nor unload",
    "module-loaded": "a module named {name} is already loaded",
    "busy": "livepatch {other} is in transition and only one transition runs at a time: "
            "retry when it ends",
    "no-kallsyms": "cannot read the kernel's symbols ({path}): {error}",
    "no-ftrace": "cannot tell which functions ftrace can redirect: {problem}",
    "unknown-function": "function {function} not found in {object}{hint}",
    "ambiguous": "function {function} is ambiguous in {object}: {count} symbols have that name{which}; "
                 "set sympos (1..{count}) for it in update.toml to choose one",
    "sympos-range": "sympos {sympos} of {function} is out of range: {object} has {count} symbol(s) "
                    "named {function}",
    "sympos-not-function": "sympos {sympos} of {function} in {object} designates a data symbol "
                           "(type {kind}), not a function{which}",
    "not-traceable": "function {function} in {object} is not traceable (absent from ftrace's "
                     "available_filter_functions: notrace, inlined or __init code), "
                     "so livepatch cannot redirect it",
    "klp-unknown-symbol": "symbol {symbol} used by the update is not in {object} "
                          "(it is resolved through kallsyms when the update loads)",
    "klp-ambiguous": "symbol {symbol} used by the update is ambiguous in {object}: {count} symbols have "
                     "that name; add [[symbol]] name = \"{symbol}\" with sympos (1..{count}) to update.toml",
    "klp-sympos-range": "symbol {symbol} has sympos {sympos}, but {object} has {count} symbol(s) of that name",
    "kthread-loop": "kernel thread {comm} (pid {pid}) runs {function} as its main function, a loop it never "
                    "leaves, so the transition would wait for it for ever; declare how to restart it "
                    "([[kthread]] function = \"{function}\" with stop and start hooks in update.toml)",
    "kthread-held": "kernel thread {comm} (pid {pid}) runs update {holder}'s copy of {function}, and this update "
                    "replaces {holder} without declaring a restart for {function}: the thread would keep running "
                    "the replaced update's code and pin its module; declare [[kthread]] function = "
                    "\"{function}\" or revert {holder} first",
    "ipmodify": "function {function} in {object} is already redirected by an ftrace user that is not "
                "a livepatch (kretprobe or another patching tool); loading would fail with EBUSY",
}


@dataclass(frozen=True)
class Refusal:
    """One reason preflight refuses an update."""

    code: str
    message: str

    @classmethod
    def make(cls, code: str, **fields: Any) -> Refusal:
        return cls(code, REFUSALS[code].format(**fields))


class PreflightRefused(RefusedError):
    """Preflight found reasons not to load the update; ``reasons`` lists them all."""

    def __init__(self, update: str, reasons: list[Refusal]):
        self.reasons = reasons
        if len(reasons) == 1:
            text = f"{update}: refused, nothing was changed: {reasons[0].message}"
        else:
            text = f"{update}: refused, nothing was changed:\n" + "\n".join(
                f"  - {r.message}" for r in reasons
            )
        super().__init__(text)

    def refusals(self) -> list[dict[str, str]]:
        return [{"code": r.code, "message": r.message} for r in self.reasons]
