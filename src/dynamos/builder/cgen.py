"""C generation: the livepatch glue that turns an update source's editions into a module.

The author's C files hold the editions; dynamos adds one translation unit (the "main object")
that tells livepatch which kernel function each edition replaces, plus the Kbuild file that
links both into one module. Everything here is text in, text out, so it is unit-testable.

The :class:`UpdateSource` given is trusted: :mod:`dynamos.update.validate` made it, so editions
and hooks are C identifiers (emitted bare, they could not inject C) and the description holds no
NUL (a .modinfo entry ends at NUL: the rest would read as another entry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from dynamos.abi import VMLINUX, generated_name
from dynamos.builder.elf import FENTRY_CALL_SIZE
from dynamos.builder.klp import KlpSymbol
from dynamos.update.model import FunctionSpec, UpdateSource

if TYPE_CHECKING:
    from dynamos.builder.btf import Prototype

RUNTIME_HEADER = "dynamos_editions.h"

_SIMPLE_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\n": "\\n",
    "\t": "\\t",
    "\r": "\\r",
}


def c_string(text: str) -> str:
    """Quote ``text`` as a C string literal that yields exactly its UTF-8 bytes.

    Control and non-ASCII bytes become three-digit octal escapes (never hex: a hex escape
    swallows following hex digits), and ``??`` is broken up so no trigraph can form.
    """
    out: list[str] = []
    prev = ""
    for ch in text:
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif ch == "?" and prev == "?":
            out.append("\\?")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8"))
        prev = ch
    return '"' + "".join(out) + '"'


def klp_object_name(obj: str) -> str | None:
    """The ``klp_object.name`` livepatch expects: NULL for vmlinux, else the module's name."""
    if obj == "vmlinux":
        return None
    return obj.replace("-", "_")  # the kernel names modules with '_' whatever the file says


# Every update module carries this: a write to /sys/module/<update>/parameters/signal_blockers
# does what livepatch itself does only every 15 s of a stalled transition (and 6.1 offers no
# sysfs file for): a fake signal to each user task still waiting to switch, which takes it out of
# an interruptible sleep through the signal path, where it switches; kernel threads are woken.
SIGNAL_BLOCKERS_SOURCE = """\
/* Signal the tasks a transition waits for; reading gives how many were signalled so far. */
static unsigned long dynamos_signalled;

static int dynamos_signal_blockers(const char *val, const struct kernel_param *kp)
{
\tstruct task_struct *g, *task;
\tunsigned long count = 0;

\trcu_read_lock();
\tfor_each_process_thread(g, task) {
\t\tif (!test_tsk_thread_flag(task, TIF_PATCH_PENDING))
\t\t\tcontinue;
\t\tif (task->flags & PF_KTHREAD)
\t\t\twake_up_state(task, TASK_INTERRUPTIBLE);
\t\telse
\t\t\tset_notify_signal(task);
\t\tcount++;
\t}
\trcu_read_unlock();
\tdynamos_signalled += count;
\treturn 0;
}

static const struct kernel_param_ops dynamos_signal_ops = {
\t.set = dynamos_signal_blockers,
\t.get = param_get_ulong,
};
module_param_cb(signal_blockers, &dynamos_signal_ops, &dynamos_signalled, 0600);
MODULE_PARM_DESC(signal_blockers, "write: signal the tasks the transition waits for; read: tasks signalled");
"""


def _c_ident_part(text: str) -> str:
    """A fragment usable inside a C identifier, for readable array names."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _func_entry(f: FunctionSpec) -> list[str]:
    lines = [
        "\t{",
        f"\t\t.old_name = {c_string(f.name)},",
        f"\t\t.new_func = (void *){f.edition},",
    ]
    if f.sympos is not None:
        lines.append(f"\t\t.old_sympos = {int(f.sympos)},")
    lines.append("\t},")
    return lines


def thunk_target(f: FunctionSpec) -> KlpSymbol:
    """The kernel function edition 0 jumps into, always resolved by livepatch: the loader must
    not bind a module's function (the module may load later) or the wrong namesake."""
    return KlpSymbol(f.name, f.object, f.sympos or 0)


def _dispatcher_source(index: int, f: FunctionSpec, proto: Prototype, ftrace_site: int,
                       global_switch: bool) -> list[str]:
    """Edition 0's thunk, the function's runtime descriptor and its dispatcher."""
    original = f.original
    fn = f"dynamos_fn_{index}"
    names = [f.name, *f.editions]
    out = [
        f"/* {f.object} {f.name}: edition 0 is the kernel's own code, entered past its ftrace site. */",
        *proto.forward_declarations,
        proto.declaration(original, "extern") + ";",
        "asm(\".pushsection .text, \\\"ax\\\", @progbits\\n\"",
        f'    "\\t.globl {original}\\n"',
        f'    "\\t.type {original}, @function\\n"',
        f'    "{original}:\\n"',
        f'    "\\tjmp {thunk_target(f).placeholder} + {ftrace_site + FENTRY_CALL_SIZE}\\n"',
        '    "\\tint3\\n"',
        f'    "\\t.size {original}, . - {original}\\n"',
        '    ".popsection\\n");',
    ]
    for edition in f.editions:
        out.append(proto.declaration(edition, "extern") + ";")
    if f.policy:
        out.append(_handler_declaration(proto, f.policy) + ";")
    if f.kthread:
        entry = generated_name(f.name, f.object, f.sympos, role="kthread")
        restart = f.kthread
        out += [
            "/* The thread's main function: the author's hooks restart its thread onto an edition and back. */",
            f"extern int {restart.stop}(void);",
            f"extern int {restart.start}(int (*threadfn)(void *));",
            *([f"extern int {restart.transfer}(bool to_new);"] if restart.transfer else []),
            "static " + proto.declaration(entry) + ";",
            f"static struct dynamos_kthread {fn}_kthread = {{",
            f"\t.stop = {restart.stop},",
            f"\t.start = {restart.start},",
            f"\t.transfer = {restart.transfer or 'NULL'},",
            f"\t.entry = {entry},",
            "};",
        ]
    out += [
        f"static const char *const {fn}_editions[] = {{ {', '.join(c_string(n) for n in names)} }};",
        f"static struct dynamos_function {fn} = {{",
        f"\t.name = {c_string(f.name)},",
        f"\t.dir = {c_string(f.control_name)},",
        f"\t.nr_editions = {len(names)},",
        f"\t.edition_names = {fn}_editions,",
        f"\t.initial_edition = {0 if global_switch else f.default_edition},",
        f"\t.global_edition = {f.default_edition},",
        f"\t.has_handler = {'true' if f.policy else 'false'},",
        f"\t.monitor = {'true' if f.monitor else 'false'},",
        f"\t.original = (void *){original},",
        f"\t.ftrace_site = {ftrace_site},",
        *([f"\t.kthread = &{fn}_kthread,"] if f.kthread else []),
        "};",
        "",
    ]
    out += _dispatcher_body(f, fn, proto, f.edition)
    if f.kthread:
        out.append("/* A copy of the dispatcher for the restarted thread: it is not livepatch's new function, so a")
        out.append("   reversed transition does not wait for the thread that never leaves it. */")
        out += _dispatcher_body(f, fn, proto, generated_name(f.name, f.object, f.sympos, role="kthread"),
                                ("\tWRITE_ONCE(fn->kthread->pid, current->pid);",))
    return out


def _dispatcher_body(f: FunctionSpec, fn: str, proto: Prototype, name: str, first: tuple[str, ...] = ()) -> list[str]:
    """A dispatcher called ``name``: choose the edition, count the call in, run it, count it out.
    ``first`` are statements run before anything else (the thread's copy records its pid)."""
    args = proto.argument_list()
    returns = proto.return_type != "void"
    out = [
        "static noinline " + proto.declaration(name),
        "{",
        f"\tstruct dynamos_function *fn = &{fn};",
        *([f"\t{proto.return_type} ret;"] if returns else []),
        *(["\tu64 start;"] if f.monitor else []),
        "\tint edition;",
        "",
        *first,
        "\tpreempt_disable_notrace();",
        "\tedition = dynamos_route_edition(fn);",
        *([ "\tif (edition == DYNAMOS_ASK_HANDLER)", f"\t\tedition = {f.policy}({args});"] if f.policy else []),
        "\tedition = dynamos_settle_edition(fn, edition);",
        "\tdynamos_call_begins(fn, edition);",
        "\tpreempt_enable_notrace();",
        *(["\tstart = local_clock();"] if f.monitor else []),
        "\tswitch (edition) {",
    ]
    assign = "ret = " if returns else ""
    for number, edition in enumerate(f.editions, start=1):
        out.append(f"\tcase {number}: {assign}{edition}({args}); break;")
    out += [
        f"\tdefault: {assign}{f.original}({args}); break;",
        "\t}",
        *(["\tdynamos_record_latency(fn, edition, start);"] if f.monitor else []),
        "\tdynamos_call_ends(fn, edition);",
        *(["\treturn ret;"] if returns else []),
        "}",
        "",
    ]
    return out


def _handler_declaration(proto: Prototype, handler: str) -> str:
    """The adaptation handler takes the function's arguments and returns an edition number."""
    decl = proto.declaration(handler, "extern")
    return "extern int " + decl[decl.index(handler):]


def generate_livepatch_source(source: UpdateSource, prototypes: Mapping[FunctionSpec, Prototype] | None = None,
                              ftrace_site: int = 0, import_namespaces: Iterable[str] = ()) -> str:
    """The C of the module's main translation unit: one klp_patch over every edition.

    Single editions are declared ``extern void f(void)``: only their address is taken here,
    and the author's own prototypes live in their separately compiled files. Multi-edition
    functions get a dispatcher with the kernel function's exact prototype (``prototypes``,
    from BTF); ``ftrace_site`` is the offset of the ftrace call in a kernel function.
    ``import_namespaces``: symbol namespaces of the exports the module's code uses.
    """
    dispatched = [f for f in source.functions if f.dispatched]
    missing = [f.name for f in dispatched if prototypes is None or f not in prototypes]
    if missing:
        raise ValueError(f"no prototype for multi-edition functions {', '.join(missing)}")
    out: list[str] = [
        f"/* Generated by dynamos for update {source.name}: do not edit. */",
        "",
        "#include <linux/kernel.h>",
        "#include <linux/module.h>",
        "#include <linux/livepatch.h>",
        "#include <linux/sched/signal.h>",
        *([f'#include "{RUNTIME_HEADER}"'] if dispatched else []),
        "",
        *SIGNAL_BLOCKERS_SOURCE.splitlines(),
        "",
    ]
    singles = list(dict.fromkeys(f.edition for f in source.functions if not f.dispatched))
    if singles:
        out.append("/* Editions, defined in the update source's own C files. */")
        out.extend(f"extern void {edition}(void);" for edition in singles)
        out.append("")
    for index, f in enumerate(source.functions):
        if f.dispatched:
            assert prototypes is not None
            out.extend(_dispatcher_source(index, f, prototypes[f], ftrace_site, source.consistency == "global"))
    if dispatched:
        out.append("static struct dynamos_function *dynamos_functions[] = {")
        out.extend(f"\t&dynamos_fn_{i}," for i, f in enumerate(source.functions) if f.dispatched)
        out.append("};")
        out.append("")
    if source.consistency == "global":
        out.append("/* Global consistency: every function moves to its edition at one instant. */")
        if source.transfer:
            out.append(f"extern void {source.transfer}(bool to_new);")
        out.append("static struct dynamos_global dynamos_global_state = {")
        out.append(f"\t.transfer = {source.transfer or 'NULL'},")
        out.append("};")
        out.append("")

    hooks = dict(source.hooks)
    hook_object = VMLINUX if VMLINUX in source.objects else source.objects[0]
    params, args = ("struct klp_object *obj", "obj") if source.hooks_take_object else ("void", "")
    if hooks:
        out.append("/* State-transfer hooks of the update source (livepatch callbacks). */")
        for key, function in hooks.items():
            out.append(f"extern {'int' if key == 'pre_patch' else 'void'} {function}({params});")
        out.append("")
    object_arrays: list[tuple[str, str | None, dict[str, str]]] = []
    for index, obj in enumerate(source.objects):
        array = f"dynamos_funcs_{index}_{_c_ident_part(obj)}"
        checked = [i for i, f in enumerate(source.functions) if f.dispatched and f.object == obj]
        callbacks: dict[str, str] = {}
        threads = any(source.functions[i].kthread for i in checked)
        checked_array = f"dynamos_pre_patch_{index}_functions"
        if checked:
            out.append(f"static struct dynamos_function *{checked_array}[] = {{")
            out.extend(f"\t&dynamos_fn_{i}," for i in checked)
            out.append("};")
            out.append("")
        to_original = f"\tdynamos_kthreads_to_original({checked_array}, {len(checked)}, obj);"
        if checked or (obj == hook_object and "pre_patch" in hooks):
            callbacks["pre_patch"] = f"dynamos_pre_patch_{index}"
            out.append(f"/* Before {obj} is patched, with its relocations applied: check edition 0's way in, "
                       "restart kernel threads onto their editions, then the author's pre_patch hook may veto. */")
            out.append(f"static int dynamos_pre_patch_{index}(struct klp_object *obj)")
            out.append("{")
            out.append("\tint err = 0;")
            out.append("")
            if checked:
                out.append(f"\terr = dynamos_check_entries({checked_array}, {len(checked)});")
            if threads:
                out.append("\tif (!err)")
                out.append(f"\t\terr = dynamos_kthreads_to_new({checked_array}, {len(checked)});")
            if obj == hook_object and "pre_patch" in hooks:
                out.append("\tif (!err)")
                out.append(f"\t\terr = {hooks['pre_patch']}({args});")
                if threads:
                    out.append("\tif (err)")
                    out.append("\t" + to_original)
            out.append("\treturn err;")
            out.append("}")
            out.append("")
        if checked or (obj == hook_object and "post_patch" in hooks):
            callbacks["post_patch"] = f"dynamos_post_patch_{index}"
            out.append(f"/* {obj} is patched and every task switched: no call runs in a predecessor's "
                       "dispatchers any more. */")
            out.append(f"static void dynamos_post_patch_{index}(struct klp_object *obj)")
            out.append("{")
            if checked:
                out.append(f"\tdynamos_takeover_complete({checked_array}, {len(checked)});")
            if obj == hook_object and "post_patch" in hooks:
                out.append(f"\t{hooks['post_patch']}({args});")
            out.append("}")
            out.append("")
        for key in ("pre_unpatch", "post_unpatch"):
            author = hooks.get(key) if obj == hook_object else None
            if not author and not threads:
                continue
            callbacks[key] = f"dynamos_{key}_{index}"
            if threads and key == "pre_unpatch":
                out.append("/* Threads go back to the kernel's code before unpatching; a reversed or cancelled "
                           "transition only calls post_unpatch, so it tries again there. */")
            out.append(f"static void dynamos_{key}_{index}(struct klp_object *obj)")
            out.append("{")
            if key == "pre_unpatch" and author:
                out.append(f"\t{author}({args});")
            if threads:
                out.append(to_original)
            if key == "post_unpatch" and author:
                out.append(f"\t{author}({args});")
            out.append("}")
            out.append("")
        object_arrays.append((array, klp_object_name(obj), callbacks))
        out.append(f"/* Functions replaced in {obj}. */")
        out.append(f"static struct klp_func {array}[] = {{")
        for f in source.functions:
            if f.object == obj:
                out.extend(_func_entry(f))
        out.append("\t{ }")
        out.append("};")
        out.append("")

    out.append("static struct klp_object dynamos_objects[] = {")
    for array, kname, callbacks in object_arrays:
        out.append("\t{")
        out.append(f"\t\t.name = {'NULL' if kname is None else c_string(kname)},")
        out.append(f"\t\t.funcs = {array},")
        for key, function in callbacks.items():
            out.append(f"\t\t.callbacks.{key} = {function},")
        out.append("\t},")
    out.append("\t{ }")
    out.append("};")
    out.append("")

    if source.states:
        out.append("/* System states this update sets up; a replacing update must know them (klp_state). */")
        out.append("static struct klp_state dynamos_states[] = {")
        out.extend(f"\t{{ .id = {sid}, .version = {version} }}," for sid, version in source.states)
        out.append("\t{ }")
        out.append("};")
        out.append("")
    out.append("static struct klp_patch dynamos_patch = {")
    out.append("\t.mod = THIS_MODULE,")
    out.append("\t.objs = dynamos_objects,")
    if source.states:
        out.append("\t.states = dynamos_states,")
    if source.replace:
        out.append("\t.replace = true,")
    out.append("};")
    out.append("")

    description = source.description or f"dynamos update {source.name}"
    if dispatched:
        count = "ARRAY_SIZE(dynamos_functions)"
        out.extend([
            "static int __init dynamos_update_init(void)",
            "{",
            f"\tint err = dynamos_runtime_init(THIS_MODULE, dynamos_functions, {count}, "
            f"{'&dynamos_global_state' if source.consistency == 'global' else 'NULL'}, "
            f"{'true' if source.replace else 'false'});",
            "",
            "\tif (err)",
            "\t\treturn err;",
            "\terr = klp_enable_patch(&dynamos_patch);",
            "\tif (err)",
            f"\t\tdynamos_runtime_exit(dynamos_functions, {count});",
            "\treturn err;",
            "}",
            "",
            "/* Livepatch lets the module go only once the patch is disabled: no call is in a dispatcher. */",
            "static void __exit dynamos_update_exit(void)",
            "{",
            f"\tdynamos_runtime_exit(dynamos_functions, {count});",
            "}",
            "",
            "MODULE_INFO(dynamos_runtime, __stringify(DYNAMOS_RUNTIME_VERSION));",
        ])
    else:
        out.extend([
            "static int __init dynamos_update_init(void)",
            "{",
            "\treturn klp_enable_patch(&dynamos_patch);",
            "}",
            "",
            "/* Livepatch lets the module go only once the patch is disabled: nothing is left to undo. */",
            "static void __exit dynamos_update_exit(void)",
            "{",
            "}",
            "",
        ])
    out.extend([
        "module_init(dynamos_update_init);",
        "module_exit(dynamos_update_exit);",
        'MODULE_LICENSE("GPL");',
        'MODULE_INFO(livepatch, "Y");',
        f"MODULE_DESCRIPTION({c_string(description)});",
        f"MODULE_INFO(dynamos, {c_string(source.name)});",
        *(f"MODULE_IMPORT_NS({_c_identifier(ns)});" for ns in import_namespaces),
        "",
    ])
    return "\n".join(out)


def _c_identifier(name: str) -> str:
    """A namespace name pasted into C (6.1's MODULE_IMPORT_NS takes it unquoted)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"symbol namespace {name!r} is not a C identifier")
    return name


def generate_kbuild(source: UpdateSource, main_object: str, author_objects: list[str]) -> str:
    """The Kbuild file linking the main object and the author's objects into one module.

    Objects are paths relative to the build directory ending in ``.o`` (``src/edit.o``). None
    may be named like the module itself: Kbuild would then read the module as its own part.
    """
    module = f"{source.livepatch_name}.o"
    parts = [main_object, *author_objects]
    for part in parts:
        if not part.endswith(".o"):
            raise ValueError(f"Kbuild object {part!r} must end in .o")
        if part == module:
            raise ValueError(f"Kbuild object {part!r} clashes with the module {module}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"duplicate Kbuild objects in {parts}")
    return (
        f"# Generated by dynamos for update {source.name}: do not edit.\n"
        f"obj-m := {module}\n"
        f"{source.livepatch_name}-y := {' '.join(parts)}\n"
        "# The update's C may include the headers dynamos ships (dynamos_shadow.h).\n"
        "ccflags-y += -I$(src)\n"
    )
