"""The phases of the operations that change a kernel, named, so fault tests can stop at each.

Every boundary where a kill or a Ctrl-C would leave the kernel and dynamos' files in a different
state is a phase; ``PHASES`` lists them in the order an operation passes them, and the code calls
``reached(operation, phase)`` at each. Tests walk the registry (``tests/lab/test_faults_lab.py``
kills or interrupts an operation at every phase on the real kernel), so "every phase" is
checkable: a unit test checks each registered phase is reached and every call names a
registered one.

apply (``LiveKernel.apply``):
  locked              the operation lock is held; nothing read yet
  verified            the package is read and its signature checked (nothing changed)
  preflighted         every check passed (nothing changed)
  intent-logged       the journal's intent line is written: from here an interruption is visible
  recorded            dynamos' record of the update is written, no module loaded yet
  loaded              init_module returned: the livepatch exists and its transition runs
  transition-waiting  dynamos is waiting for the transition (Ctrl-C here is undone by it)
  transitioned        every task runs the update (global: still every function's edition 0)
  switched            global consistency only: every function switched to its new edition
  replaced-unloaded   the modules of updates this one replaced are unloaded
  result-logged       the result line is written (the lock is still held)

revert (``LiveKernel.revert``):
  locked, preflighted, intent-logged as above
  switched-back       global consistency only: every function back on edition 0, still enabled
  disable-started     enabled=0 written: tasks are moving back to the original code
  disabled            every task runs the original code; the module is still loaded
  unloaded            the module is unloaded; the record not yet removed
  result-logged       as above

switch (``editions.switch``):
  locked, intent-logged as above
  routed              the route command is written: new calls take the new route
  result-logged       as above

A test sets ``DYNAMOS_TEST_FAULT=OPERATION:PHASE:SIGNAL`` (SIGNAL ``KILL`` or ``INT``): at that
phase the process sends itself the signal (SIGINT is then a KeyboardInterrupt, as a real Ctrl-C).
An operation, phase or signal the registry does not know is an error, so a typo cannot make a
test pass without stopping anything. Unset, ``reached`` costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "DYNAMOS_TEST_FAULT"

PHASES: dict[str, tuple[str, ...]] = {
    "apply": ("locked", "verified", "preflighted", "intent-logged", "recorded", "loaded",
              "transition-waiting", "transitioned", "switched", "replaced-unloaded", "result-logged"),
    "revert": ("locked", "preflighted", "intent-logged", "switched-back", "disable-started", "disabled",
               "unloaded", "result-logged"),
    "switch": ("locked", "intent-logged", "routed", "result-logged"),
}

# Phases only an update with global consistency passes.
GLOBAL_ONLY: dict[str, tuple[str, ...]] = {"apply": ("switched",), "revert": ("switched-back",)}

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}


class FaultSpecError(ValueError):
    """``DYNAMOS_TEST_FAULT`` names an operation, phase or signal that does not exist."""


def parse_fault(text: str) -> tuple[str, str, str]:
    """``OPERATION:PHASE:SIGNAL`` checked against the registry."""
    parts = text.split(":")
    if len(parts) != 3:
        raise FaultSpecError(f"{FAULT_ENV}={text!r}: expected OPERATION:PHASE:SIGNAL")
    operation, phase, sig = parts
    if operation not in PHASES:
        raise FaultSpecError(f"{FAULT_ENV}={text!r}: no operation {operation!r} (known: {', '.join(PHASES)})")
    if phase not in PHASES[operation]:
        raise FaultSpecError(f"{FAULT_ENV}={text!r}: {operation} has no phase {phase!r} "
                             f"(phases: {', '.join(PHASES[operation])})")
    if sig not in SIGNALS:
        raise FaultSpecError(f"{FAULT_ENV}={text!r}: signal {sig!r} is not one of {', '.join(SIGNALS)}")
    return operation, phase, sig


def reached(operation: str, phase: str) -> None:
    """``operation`` has reached ``phase``: stop here if a test asked to (see the module docstring)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    fault_op, fault_phase, sig = parse_fault(wanted)
    if phase not in PHASES.get(operation, ()):
        raise FaultSpecError(f"phase {operation}:{phase} is reached but not registered in PHASES")
    if (fault_op, fault_phase) != (operation, phase):
        return
    os.kill(os.getpid(), SIGNALS[sig])  # SIGINT: Python raises KeyboardInterrupt here
    time.sleep(5)  # a signal still pending is delivered in the sleep
    raise KeyboardInterrupt(f"{FAULT_ENV}: {operation}:{phase}")  # SIGINT was not handled as Ctrl-C
