"""Multi-edition functions: manifest schema, dispatcher generation, control-file parsing, and a
real build of the example against the lab kernel's headers and BTF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.btf import Param, Prototype
from dynamos.builder.cgen import generate_livepatch_source
from dynamos.builder.kbuild import build_update, read_modinfo
from dynamos.errors import RefusedError, UpdateSourceError
from dynamos.kernel.editions import (
    Latency,
    Selector,
    function_control,
    parse_editions,
    parse_latency,
)
from dynamos.monitor import monitor_name, monitor_update_toml
from dynamos.update.validate import load_update_source

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE = EXAMPLES / "cmdline-editions"

PIPE_WRITE = Prototype(
    name="pipe_write", return_type="long",
    params=(Param("iocb", "struct kiocb *iocb"), Param("from", "struct iov_iter *from")),
    variadic=False, forward_declarations=("struct iov_iter;", "struct kiocb;"))
SCHEDULE = Prototype(name="schedule", return_type="void", params=(), variadic=False, forward_declarations=())


def source(tmp_path: Path, functions: str, c: str = "") -> Path:
    directory = tmp_path / "src"
    directory.mkdir(exist_ok=True)
    (directory / "update.toml").write_text('[update]\nname = "pipes"\ndescription = "d"\n\n' + functions)
    if c:
        (directory / "e.c").write_text(c)
    return directory


EDITIONS_C = "long w2(void *a, void *b) { return 0; }\nlong w3(void *a, void *b) { return 0; }\n"


# --- manifest ----------------------------------------------------------------------------------


def test_editions_manifest_loads(tmp_path: Path) -> None:
    d = source(tmp_path, '[[function]]\nname = "pipe_write"\neditions = ["w2", "w3"]\npolicy = "pick"\n'
                         'default = 2\nmonitor = true\n', EDITIONS_C + "int pick(void *a, void *b) { return 1; }\n")
    (f,) = load_update_source(d).functions
    assert f.editions == ("w2", "w3") and f.policy == "pick" and f.default_edition == 2 and f.monitor
    assert f.dispatched and f.edition == "dynamos_dispatch__pipe_write"
    assert f.original == "dynamos_original__pipe_write"
    assert f.author_functions == ("w2", "w3", "pick")


def test_default_edition_is_the_first_new_one_and_policy_default_means_none(tmp_path: Path) -> None:
    d = source(tmp_path, '[[function]]\nname = "pipe_write"\neditions = ["w2"]\npolicy = "default"\n', EDITIONS_C)
    (f,) = load_update_source(d).functions
    assert f.default_edition == 1 and f.policy is None and not f.monitor


def test_monitor_only_function_needs_no_c(tmp_path: Path) -> None:
    d = source(tmp_path, '[[function]]\nname = "vfs_read"\nmonitor = true\nsympos = 2\n')
    (f,) = load_update_source(d).functions
    assert f.editions == () and f.default_edition == 0 and f.author_functions == ()
    assert f.edition == "dynamos_dispatch__vfs_read__2" and f.control_name == "vfs_read,2"


@pytest.mark.parametrize("body, message, line", [
    ('editions = ["w2"]\nedition = "w3"\n', "either edition", 8),
    ("editions = []\n", "editions is empty", 7),
    ('editions = ["w2", "w2"]\n', "more than once", 7),
    ('editions = ["w2"]\ndefault = 2\n', "default must be an edition number from 0 (the original) to 1", 8),
    ('editions = ["w2"]\nmonitor = "yes"\n', "monitor must be true or false", 8),
    ('editions = ["w2"]\npolicy = "w2"\n', "also listed as an edition", 8),
    ('editions = ["w2", 3]\n', "array of C function names", 7),
    ('editions = ["not-c"]\n', "is not a C identifier", 7),
    ('editions = ["w2"]\npolicy = "nosuch"\n', "adaptation handler 'nosuch' is not defined", 8),
    ('editions = ["w2", "w4"]\n', "edition 'w4' is not defined", 7),
])
def test_bad_editions_name_the_line(tmp_path: Path, body: str, message: str, line: int) -> None:
    d = source(tmp_path, '[[function]]\nname = "pipe_write"\n' + body, EDITIONS_C)
    with pytest.raises(UpdateSourceError) as info:
        load_update_source(d)
    assert message in str(info.value)
    assert info.value.line == line and info.value.path == d / "update.toml"


def test_too_many_editions(tmp_path: Path) -> None:
    names = [f"e{i}" for i in range(16)]
    c = "".join(f"long {n}(void) {{ return 0; }}\n" for n in names)
    d = source(tmp_path, f'[[function]]\nname = "pipe_write"\neditions = {names!r}\n'.replace("'", '"'), c)
    with pytest.raises(UpdateSourceError, match="16 editions; at most 15"):
        load_update_source(d)


# --- C generation -------------------------------------------------------------------------------


def generated(tmp_path: Path, functions: str, c: str, prototypes: dict[str, Prototype], site: int = 0) -> str:
    src = load_update_source(source(tmp_path, functions, c))
    return generate_livepatch_source(src, {f: prototypes[f.name] for f in src.functions if f.dispatched}, site)


def test_dispatcher_forwards_arguments_and_return_value(tmp_path: Path) -> None:
    text = generated(tmp_path, '[[function]]\nname = "pipe_write"\neditions = ["w2", "w3"]\n', EDITIONS_C,
                     {"pipe_write": PIPE_WRITE})
    assert "static noinline long dynamos_dispatch__pipe_write(struct kiocb *iocb, struct iov_iter *from)" in text
    assert "case 1: ret = w2(iocb, from); break;" in text
    assert "case 2: ret = w3(iocb, from); break;" in text
    assert "default: ret = dynamos_original__pipe_write(iocb, from); break;" in text
    assert "jmp dynamos_klp__vmlinux__pipe_write__0 + 5" in text
    assert ".new_func = (void *)dynamos_dispatch__pipe_write," in text
    assert ".callbacks.pre_patch = dynamos_pre_patch_0," in text
    assert "dynamos_runtime_init(THIS_MODULE, dynamos_functions" in text
    assert "local_clock" not in text.split("dynamos_dispatch__pipe_write(")[1]  # not monitored
    assert "extern long w2(struct kiocb *iocb, struct iov_iter *from);" in text


def test_dispatcher_of_void_function_with_handler_monitor_and_ibt(tmp_path: Path) -> None:
    c = "void s2(void) {}\nint pick(void) { return 1; }\n"
    text = generated(tmp_path, '[[function]]\nname = "schedule"\neditions = ["s2"]\npolicy = "pick"\n'
                               "monitor = true\n", c, {"schedule": SCHEDULE}, site=4)
    body = text.split("dynamos_dispatch__schedule(void)")[1]
    assert "ret" not in body.split("}")[0].replace("return", "")
    assert "edition = pick();" in body and "extern int pick(void);" in text
    assert "start = local_clock();" in body and "dynamos_record_latency(fn, edition, start);" in body
    assert "jmp dynamos_klp__vmlinux__schedule__0 + 9" in text  # past ENDBR and the ftrace call
    assert ".has_handler = true," in text and ".monitor = true," in text


def test_generation_needs_every_prototype(tmp_path: Path) -> None:
    src = load_update_source(source(tmp_path, '[[function]]\nname = "pipe_write"\neditions = ["w2"]\n', EDITIONS_C))
    with pytest.raises(ValueError, match="no prototype for multi-edition functions pipe_write"):
        generate_livepatch_source(src)


# --- control files ------------------------------------------------------------------------------


def test_parse_editions_and_latency() -> None:
    states = parse_editions("0 pipe_write 10 0 live\n1 w2 5 -1 retired\n")
    assert [(s.index, s.name, s.calls, s.in_flight, s.live) for s in states] == [
        (0, "pipe_write", 10, 0, True), (1, "w2", 5, -1, False)]
    (lat,) = parse_latency("0 3000 " + " ".join(["0"] * 9 + ["2", "1"] + ["0"] * 29) + "\n")
    assert lat.calls == 3 and lat.mean_ns == 1000
    assert lat.percentile_ns(0.5) == 1024 and lat.percentile_ns(0.99) == 2048
    assert Latency(0, 0, (0,) * 40).percentile_ns(0.5) is None


def test_selector_commands() -> None:
    assert Selector().command(2) == "default 2"
    assert Selector(pids=(10, 11)).command(1) == "pids 1 10,11"
    assert Selector(cpus="0-1").command(0) == "cpus 0 0-1"
    assert Selector(share=12.5).command(2) == "share 2 1250"
    with pytest.raises(RefusedError, match="one selector per switch"):
        Selector(pids=(1,), share=5).command(1)
    with pytest.raises(RefusedError, match="percentage"):
        Selector(share=150).command(1)
    with pytest.raises(RefusedError, match="positive process ids"):
        Selector(pids=(0,)).command(1)


def test_function_control_names_what_exists(tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match="no update named pipes is loaded"):
        function_control("pipes", "pipe_write", tmp_path)
    (tmp_path / "sys/module/pipes").mkdir(parents=True)
    with pytest.raises(RefusedError, match="has no multi-edition functions"):
        function_control("pipes", "pipe_write", tmp_path)
    for name in ("pipe_write", "c_start,1", "c_start,2"):
        (tmp_path / "sys/module/pipes/dynamos" / name).mkdir(parents=True)
    assert function_control("pipes", "pipe_write", tmp_path).function == "pipe_write"
    assert function_control("pipes", "c_start,2", tmp_path).function == "c_start,2"
    with pytest.raises(RefusedError, match="c_start is ambiguous"):
        function_control("pipes", "c_start", tmp_path)
    with pytest.raises(RefusedError, match=r"its functions: c_start,1, c_start,2, pipe_write"):
        function_control("pipes", "pipe_read", tmp_path)


def test_monitor_manifest_is_a_valid_update(tmp_path: Path) -> None:
    assert monitor_name(["vfs_read"]) == "monitor-vfs-read"
    assert monitor_name(["vfs_read", "binfmt_misc:load_misc_binary"]) == "monitor-vfs-read-and-1"
    d = tmp_path / "m"
    d.mkdir()
    (d / "update.toml").write_text(monitor_update_toml(["vfs_read", "binfmt_misc:load_misc_binary"], "mon"))
    functions = load_update_source(d).functions
    assert [(f.name, f.object, f.monitor, f.editions) for f in functions] == [
        ("vfs_read", "vmlinux", True, ()), ("load_misc_binary", "binfmt_misc", True, ())]
    with pytest.raises(UpdateSourceError, match="not a function name"):
        monitor_update_toml(["vfs read"], "mon")


# --- a real build -------------------------------------------------------------------------------


def test_example_builds_with_dispatcher_runtime_and_livepatch_thunk(tmp_path: Path, target) -> None:
    result = build_update(EXAMPLE, target, output=tmp_path)
    info = read_modinfo(result.module)
    assert info["dynamos_runtime"] == "2" and info["livepatch"] == "Y"
    elf = ELFFile(open(result.module_path, "rb"))
    names = {s.name: s for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert "dynamos_dispatch__cmdline_proc_show" in names
    assert "dynamos_original__cmdline_proc_show" in names
    # Edition 0 jumps into the kernel function: resolved by livepatch, never by the loader.
    assert ".klp.sym.vmlinux.cmdline_proc_show,0" in names
    assert not any(n.startswith("dynamos_klp__") for n in names)
    assert any(s.name.startswith(".klp.rela.vmlinux.") for s in elf.iter_sections())
    assert os.path.getsize(result.package_path) > 0


# --- global consistency -------------------------------------------------------------------------


def test_global_update_sends_every_function_through_a_dispatcher(tmp_path: Path) -> None:
    c = EDITIONS_C + "void convert(_Bool to_new) {}\n"
    d = tmp_path / "g"
    d.mkdir()
    (d / "update.toml").write_text('[update]\nname = "g"\ndescription = "d"\nconsistency = "global"\n'
                                   'transfer = "convert"\n\n[[function]]\nname = "pipe_write"\nedition = "w2"\n')
    (d / "e.c").write_text(c)
    src = load_update_source(d)
    (f,) = src.functions
    assert src.consistency == "global" and src.transfer == "convert"
    assert f.dispatched and f.editions == ("w2",) and f.default_edition == 1
    text = generate_livepatch_source(src, {f: PIPE_WRITE})
    assert ".initial_edition = 0," in text and ".global_edition = 1," in text  # loads on the original
    assert "extern void convert(bool to_new);" in text and ".transfer = convert," in text
    assert "dynamos_functions, ARRAY_SIZE(dynamos_functions), &dynamos_global_state, false);" in text


@pytest.mark.parametrize("update, message", [
    ('consistency = "total"\n', "consistency 'total' is not one of per-task, global"),
    ('transfer = "convert"\n', "it needs consistency = \"global\""),
    ('consistency = "global"\ntransfer = "nosuch"\n', "transfer hook 'nosuch' is not defined"),
])
def test_bad_consistency_settings(tmp_path: Path, update: str, message: str) -> None:
    d = tmp_path / "g"
    d.mkdir()
    (d / "update.toml").write_text(f'[update]\nname = "g"\ndescription = "d"\n{update}\n'
                                   '[[function]]\nname = "pipe_write"\nedition = "w2"\n')
    (d / "e.c").write_text(EDITIONS_C + "void convert(_Bool to_new) {}\n")
    with pytest.raises(UpdateSourceError, match=message) as info:
        load_update_source(d)
    assert info.value.line == 3 + update.count("\n")  # the offending key is the last one given


# --- hooks, states, shadow data -----------------------------------------------------------------


def test_hooks_and_states_become_callbacks_and_klp_states(tmp_path: Path) -> None:
    d = source(tmp_path, '[[function]]\nname = "pipe_write"\nedition = "w2"\n\n[hooks]\npre_patch = "up"\n'
                         'post_unpatch = "down"\n\n[[state]]\nid = 3\nversion = 2\n',
               EDITIONS_C + "int up(void) { return 0; }\nvoid down(void) {}\n")
    src = load_update_source(d)
    assert src.hooks == (("pre_patch", "up"), ("post_unpatch", "down")) and src.states == ((3, 2),)
    text = generate_livepatch_source(src)
    assert "extern int up(void);" in text and "extern void down(void);" in text
    assert "err = up();" in text and ".callbacks.pre_patch = dynamos_pre_patch_0," in text
    assert ".callbacks.post_unpatch = dynamos_post_unpatch_0," in text
    assert "{ .id = 3, .version = 2 }," in text and ".states = dynamos_states," in text


@pytest.mark.parametrize("tables, message", [
    ('[hooks]\nafter = "up"\n', "unknown key 'after'"),
    ('[hooks]\npre_patch = "nosuch"\n', "pre_patch hook 'nosuch' is not defined"),
    ("[[state]]\nid = 1\n", "version must be a positive integer"),
    ("[[state]]\nid = 1\nversion = 1\n[[state]]\nid = 1\nversion = 2\n", "state id 1 is given twice"),
])
def test_bad_hooks_and_states(tmp_path: Path, tables: str, message: str) -> None:
    d = source(tmp_path, '[[function]]\nname = "pipe_write"\nedition = "w2"\n\n' + tables,
               EDITIONS_C + "int up(void) { return 0; }\n")
    with pytest.raises(UpdateSourceError, match=message):
        load_update_source(d)


def test_shadow_helpers_compile_into_updates_that_include_them(tmp_path: Path, target) -> None:
    result = build_update(EXAMPLES / "pipe-bytes", target, output=tmp_path)
    names = {s.name for s in ELFFile(open(result.module_path, "rb")).get_section_by_name(".symtab").iter_symbols()}
    assert {"dynamos_shadow_live", "dynamos_shadow_free_all", "pipe_write_accounted"} <= names
    plain = build_update(EXAMPLE, target, output=tmp_path)
    names = {s.name for s in ELFFile(open(plain.module_path, "rb")).get_section_by_name(".symtab").iter_symbols()}
    assert "dynamos_shadow_live" not in names  # only updates that use shadow data carry it


# --- kernel threads ----------------------------------------------------------------------------

THREAD_MAIN = Prototype(name="loopd_main", return_type="int", params=(Param("data", "void *data"),),
                        variadic=False, forward_declarations=())
KTHREAD_C = ("int loop_v2(void *data) { return 0; }\nint stop_it(void) { return 0; }\n"
             "int start_it(int (*fn)(void *)) { return 0; }\nint carry(bool to_new) { return 0; }\n")
KTHREAD_TOML = ('[[function]]\nname = "loopd_main"\nedition = "loop_v2"\n\n'
                '[[kthread]]\nfunction = "loopd_main"\nstop = "stop_it"\nstart = "start_it"\ntransfer = "carry"\n')


def test_kthread_function_gets_a_dispatcher_a_thread_entry_and_restart_callbacks(tmp_path: Path) -> None:
    (f,) = load_update_source(source(tmp_path, KTHREAD_TOML, KTHREAD_C)).functions
    assert f.dispatched and f.editions == ("loop_v2",) and f.kthread is not None
    assert (f.kthread.stop, f.kthread.start, f.kthread.transfer) == ("stop_it", "start_it", "carry")
    text = generate_livepatch_source(load_update_source(tmp_path / "src"), {f: THREAD_MAIN})
    assert "static noinline int dynamos_kthread__loopd_main(void *data)" in text
    assert ".entry = dynamos_kthread__loopd_main," in text and ".transfer = carry," in text
    assert ".kthread = &dynamos_fn_0_kthread," in text
    # the thread runs the entry, livepatch redirects to the dispatcher: two different functions
    assert ".new_func = (void *)dynamos_dispatch__loopd_main," in text
    assert "err = dynamos_kthreads_to_new(dynamos_pre_patch_0_functions, 1);" in text
    for key in ("pre_unpatch", "post_unpatch"):
        assert f".callbacks.{key} = dynamos_{key}_0," in text
    assert text.count("dynamos_kthreads_to_original(dynamos_pre_patch_0_functions, 1, obj);") == 2


@pytest.mark.parametrize("tables, message", [
    ('[[kthread]]\nfunction = "nosuch"\nstop = "stop_it"\nstart = "start_it"\n',
     "function 'nosuch' is not replaced by any"),
    ('[[kthread]]\nfunction = "loopd_main"\nstart = "start_it"\n', "missing required key 'stop'"),
    ('[[kthread]]\nfunction = "loopd_main"\nstop = "stop_it"\nstart = "begin"\n', "start hook 'begin' is not defined"),
    ('[[kthread]]\nfunction = "loopd_main"\nstop = "stop_it"\nstart = "start_it"\n' * 2, "already has a [[kthread]]"),
    ('[[kthread]]\nfunction = "loopd_main"\nstop = "stop_it"\nstart = "start_it"\nwhen = 1\n', "unknown key 'when'"),
])
def test_bad_kthread_tables(tmp_path: Path, tables: str, message: str) -> None:
    d = source(tmp_path, '[[function]]\nname = "loopd_main"\nedition = "loop_v2"\n\n' + tables, KTHREAD_C)
    with pytest.raises(UpdateSourceError, match=message.replace("[", r"\[")):
        load_update_source(d)


def test_kthread_restart_needs_per_task_consistency(tmp_path: Path) -> None:
    d = tmp_path / "src"
    d.mkdir()
    (d / "update.toml").write_text('[update]\nname = "pipes"\ndescription = "d"\nconsistency = "global"\n\n'
                                   + KTHREAD_TOML)
    (d / "e.c").write_text(KTHREAD_C)
    with pytest.raises(UpdateSourceError, match="use consistency = \"per-task\"") as info:
        load_update_source(d)
    assert info.value.line == 10  # the [[kthread]] header


def test_only_int_of_one_pointer_is_a_thread_function() -> None:
    from dynamos.builder.dispatch import _is_thread_function
    assert _is_thread_function(THREAD_MAIN)
    assert _is_thread_function(Prototype(name="kswapd", return_type="int", params=(Param("p", "void *p"),),
                                         variadic=False, forward_declarations=()))
    assert not _is_thread_function(PIPE_WRITE) and not _is_thread_function(SCHEDULE)
    assert not _is_thread_function(Prototype(name="f", return_type="int", params=(Param("n", "int n"),),
                                             variadic=False, forward_declarations=()))


def test_thread_state_is_read_from_the_thread_control_file(tmp_path: Path) -> None:
    from dynamos.kernel.editions import FunctionControl
    d = tmp_path / "kswapd"
    d.mkdir()
    (d / "editions").write_text("0 kswapd 0 0 live\n1 kswapd_counted 1 1 live\n")
    (d / "route").write_text("default 1\n")
    control = FunctionControl("kswapd_restart", "kswapd", d)
    assert control.thread() is None and "thread" not in control.to_json()
    (d / "thread").write_text("on new\npid 190\nrestarts 1\nlast_restart_ns 1875542\nlast_error 0\n")
    assert control.to_json()["thread"] == {"on": "new", "pid": 190, "restarts": 1, "last_restart_ns": 1875542,
                                           "last_error": 0}
