"""The target's symbol table read from a lab booted with ``nokaslr``, cached per kernel (see
``dynamos.target.symtab``)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

from dynamos.errors import TargetError
from dynamos.lab.vm import Lab, LabConfig
from dynamos.target.fetch import TargetKernel
from dynamos.target.symtab import KALLSYMS_FILE, SymbolTable, check_link_time, kallsyms_path, vmlinux_text_address


def lab_symbol_table(target: TargetKernel, progress: Callable[[str], None] | None = None) -> SymbolTable:
    """The target's kallsyms at link-time addresses: from the cache, or read once in a lab
    booted with ``nokaslr``."""
    say = progress or (lambda _m: None)
    path = kallsyms_path(target)
    if path.is_file():
        return SymbolTable.read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{KALLSYMS_FILE}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first uses boot one lab, not two
        if path.is_file():
            return SymbolTable.read(path)
        text = read_lab_kallsyms(target, say)
        table = SymbolTable.parse(text)
        check_link_time(table, vmlinux_text_address(target), target.release)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(text)
        os.replace(tmp, path)
    say(f"symbol table of {target.release} cached in {path} ({len(table)} symbols)")
    return table


def read_lab_kallsyms(target: TargetKernel, say: Callable[[str], None] | None = None) -> bytes:
    """The text of /proc/kallsyms in a lab booted with ``nokaslr`` (link-time addresses)."""
    say = say or (lambda _m: None)
    started = time.monotonic()
    lab = Lab.boot(LabConfig(kernel=target.release, append="nokaslr"), progress=say)
    try:
        result = lab.run(["cat", "/proc/kallsyms"], cwd="/", timeout=120)
    finally:
        lab.kill()
        lab.discard()
    if result.status != 0 or not result.stdout:
        raise TargetError(f"reading /proc/kallsyms in the lab of {target.release} failed "
                          f"(status {result.status}): {result.stderr.decode(errors='replace')[-300:]}")
    say(f"read {target.release}'s /proc/kallsyms in {time.monotonic() - started:.1f} s (lab boot included)")
    return result.stdout
