"""What dynamos' Python and the kernel side agree on, stated once.

The runtime C is the authority for its limits (``runtime/dynamos_editions.h``) and its control
files (the sysfs attributes of ``runtime/dynamos_routes.c`` and ``dynamos_global.c``); the values
here mirror it, and tests/unit/test_abi.py parses the C to hold them equal. The names
of generated symbols are made here and nowhere else, for the builder that emits them and for the
kernel layer that finds them on a live kernel's stacks and in its kallsyms.
"""

from __future__ import annotations

import re

# livepatch's name for the core kernel object (every other object is a module name).
VMLINUX = "vmlinux"
# kallsyms types of code (local and global text, weak text).
TEXT_TYPES = frozenset("tTwW")

# ---- runtime limits (dynamos_editions.h) ---------------------------------------------------------
RUNTIME_VERSION = 2  # DYNAMOS_RUNTIME_VERSION
MAX_EDITIONS = 16  # DYNAMOS_MAX_EDITIONS, edition 0 (the kernel's code) included
MAX_RULES = 8  # DYNAMOS_MAX_RULES: rules of one function's route
MAX_PIDS = 16  # DYNAMOS_MAX_PIDS: pids of one pids rule
LATENCY_BUCKETS = 40  # DYNAMOS_LATENCY_BUCKETS: log2 buckets of a latency line
SHARE_SCALE = 10000  # DYNAMOS_SHARE_SCALE: a share rule counts basis points
ASK_HANDLER = -1  # DYNAMOS_ASK_HANDLER: what a route answers when the adaptation handler decides

# ---- control files: /sys/module/<update>/dynamos/<function>/<file> ------------------------------
# (the runtime's sysfs attributes are named like their files)
CONTROL_DIR = "dynamos"  # DYNAMOS_CONTROL_DIR
EDITIONS_FILE = "editions"  # "index name calls in_flight live|retired", one line per edition
ROUTE_FILE = "route"  # the route as commands; write one command
RETIRE_FILE = "retire"  # write an edition number
LATENCY_FILE = "latency"  # "index total_ns" and the buckets, with monitoring
THREAD_FILE = "thread"  # a restarted kernel thread: side, pid, restarts, last restart
GLOBAL_FILE = "global"  # /sys/module/<update>/dynamos/global: the global switch's state
# /sys/module/<update>/parameters/signal_blockers: a module parameter of the generated glue (cgen)
SIGNAL_BLOCKERS_PARAM = "signal_blockers"

# ---- generated symbol names ---------------------------------------------------------------------
DISPATCH = "dispatch"  # what livepatch redirects a multi-edition function to
ORIGINAL = "original"  # edition 0: a thunk into the kernel's own function past its fentry call
KTHREAD_COPY_PREFIX = "dynamos_kthread__"  # an update's copy of a kernel thread's main function
KLP_PLACEHOLDER_PREFIX = "dynamos_klp__"  # a livepatch symbol's stand-in until the klp conversion


def generated_name(name: str, obj: str = VMLINUX, sympos: int | None = None, role: str = DISPATCH) -> str:
    """``dynamos_dispatch__pipe_write``, ``dynamos_original__ext4__ext4_fill_super__2``: names of
    generated code for a function, unique per (object, name, sympos)."""
    parts = [f"dynamos_{role}", *([obj] if obj != VMLINUX else []), name, *([str(sympos)] if sympos else [])]
    return "__".join(parts)


def edition_prefix(index: int) -> str:
    """Prefix the builder gives a changed function cut out of patched object ``index``."""
    return "dynamos_edition__" if index == 0 else f"dynamos_edition{index}__"


def edition_name(prefix: str, name: str) -> str:
    """The update's name for function ``name`` cut out with ``prefix`` (gcc's clones, such as
    ``foo.constprop.0``, are kernel functions too and need a C name)."""
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)


def klp_placeholder(obj: str, name: str, sympos: int, patched: str = "") -> str:
    """The stand-in for symbol ``name`` of ``obj``; ``patched``: the object whose relocation sections
    carry it, when that is another one (one stand-in per pair, since each pair is its own section)."""
    via = f"{patched}__via__" if patched and patched != obj else ""
    return f"{KLP_PLACEHOLDER_PREFIX}{via}{obj}__{name}__{sympos}"
