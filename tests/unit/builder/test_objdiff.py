"""Function-level object diff on small C files compiled by the host gcc the way the kernel compiles.

Each test compiles an original and a patched translation unit into separate directories under the
same file name (so ``__FILE__`` agrees, as it does for the diff builder) and checks what the diff
says should go into an update, and what it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.elf.sections import SECTION_RULES, Handling, section_rule
from dynamos.builder.linemap import stabilise_lines
from dynamos.builder.objdiff import DiffResult, ObjectInfo, diff_objects, read_object
from dynamos.errors import BuildError
from tests.support.gcc import compile_kernel_like
from tests.support.kernel_asm import STATIC_CPU_HAS

BASE = """\
extern int printk(const char *fmt, ...);
extern void __attribute__((cold, noreturn)) panic_it(const char *fmt, ...);
extern int work(int);

static int limit = 10;
int counter_table[4] = {1, 2, 3, 4};

static inline int helper(int x)
{
\treturn x * 7 + limit;
}

int caller_one(int x)
{
\treturn helper(x) + 1;
}

int caller_two(int x)
{
\treturn helper(x) - 2;
}

int third(int x)
{
\tprintk("third %d\\n", x);
\treturn x + counter_table[x & 3];
}

int show_banner(int x)
{
\tprintk("banner: version %d\\n", x);
\treturn printk("shared tail %d\\n", x);
}

int also_tail(int x)
{
\treturn printk("shared tail %d\\n", x + 1);
}

void set_limit(int v)
{
\tlimit = v;
}

int count_calls(int x)
{
\treturn x + 1;
}

static const char greeting[] = "hello";

int greet(int i)
{
\treturn greeting[i & 7];
}

__attribute__((section(".init.text"))) int setup_thing(void)
{
\tprintk("setting up\\n");
\treturn 0;
}

__attribute__((no_instrument_function)) int fast_path(int x)
{
\treturn x * 5;
}

int checked(int x)
{
\tint s = work(x);
\tif (s < 0)
\t\tpanic_it("bad value %d from %d\\n", s, x);
\treturn s * 3;
}

int line_user(int x)
{
\tprintk("at line %d\\n", __LINE__);
\treturn x;
}
"""

BASE_FUNCTIONS = {"caller_one", "caller_two", "third", "show_banner", "also_tail", "set_limit", "count_calls",
                  "greet", "setup_thing", "fast_path", "checked", "line_user"}


def compile_c(directory: Path, text: str) -> ObjectInfo:
    """Compile ``text`` as ``directory/unit.c`` with the kernel-like flags and read the object."""
    return read_object(compile_kernel_like(directory, "unit", text))


def patch(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def diff(tmp_path: Path, original: str, patched: str, *, stabilise: bool = True) -> DiffResult:
    """Diff as the builder does: the patched file keeps the original's line numbers (linemap)."""
    if stabilise:
        patched = stabilise_lines(original, patched)
    return diff_objects(compile_c(tmp_path / "orig", original), compile_c(tmp_path / "patched", patched))


def names(changes: list) -> set[str]:
    return {c.name for c in changes}


def refusal(result: DiffResult, name: str) -> str:
    found = [r.reason for r in result.refused if r.name == name]
    assert found, f"{name} not refused: {result.refused}"
    return found[0]


def test_reads_functions_data_and_cold_parts(tmp_path: Path) -> None:
    info = compile_c(tmp_path, BASE)
    assert BASE_FUNCTIONS <= set(info.functions)
    assert info.functions["checked.cold"].parent == "checked"
    assert [f.name for f in info.units()["checked"]] == ["checked", "checked.cold"]
    assert info.functions["third"].traceable and not info.functions["fast_path"].traceable
    assert info.functions["setup_thing"].section == ".init.text"
    assert {"limit", "counter_table", "greeting"} <= set(info.data)
    assert info.data["limit"].binding == "local" and info.data["counter_table"].binding == "global"
    # A string is known by its text, not by where it lies in the function's string section.
    assert any(r.symbol == ".rodata.str:shared tail %d\n" for r in info.functions["also_tail"].relocs)
    # Relocation sites are masked: the fentry call's displacement reads as zeros.
    assert info.functions["third"].code[1:5] == bytes(4)


def test_unchanged_file_changes_nothing(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, BASE)
    assert (result.changed, result.new, result.removed, result.refused, result.new_data) == ([], [], [], [], [])
    assert set(result.unchanged) == BASE_FUNCTIONS


def test_string_change_changes_only_its_function(tmp_path: Path) -> None:
    # The new text is longer, so "shared tail" moves within show_banner's string section, which
    # also_tail references: that move is not a change of also_tail.
    result = diff(tmp_path, BASE, patch(BASE, "banner: version %d", "banner: release %d, patched by dynamos"))
    assert shared_tail_offset(tmp_path / "orig") != shared_tail_offset(tmp_path / "patched")
    assert names(result.changed) == {"show_banner"}
    assert "banner: release" in result.changed[0].reason
    assert "also_tail" in result.unchanged and not result.refused


def shared_tail_offset(directory: Path) -> int:
    """Where also_tail's string lies in its section in the raw object (before normalisation)."""
    with open(directory / "unit.o", "rb") as f:
        rela = ELFFile(f).get_section_by_name(".rela.text.also_tail")
        return next(r["r_addend"] for r in rela.iter_relocations() if r["r_info_type"] == 11)


def test_static_inline_helper_change_changes_every_caller(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, patch(BASE, "return x * 7 + limit;", "return x * 9 + limit;"))
    assert names(result.changed) == {"caller_one", "caller_two"}
    assert "third" in result.unchanged and not result.refused


def test_new_helper_is_new_and_its_caller_changed(tmp_path: Path) -> None:
    patched = patch(BASE, "int third(int x)\n{\n\tprintk(\"third %d\\n\", x);\n",
                    "static __attribute__((noinline)) int new_helper(int x)\n{\n\tprintk(\"helping %d\\n\", x);\n"
                    "\treturn work(x) + 1;\n}\n\n"
                    "int third(int x)\n{\n\tx = new_helper(x);\n\tprintk(\"third %d\\n\", x);\n")
    result = diff(tmp_path, BASE, patched)
    assert names(result.new) == {"new_helper"}
    assert names(result.changed) == {"third"}
    assert "new_helper" in result.changed[0].reason
    assert not result.refused


def test_new_static_local_is_new_data_and_function_changed(tmp_path: Path) -> None:
    patched = patch(BASE, "\treturn x + 1;\n", "\tstatic int calls;\n\n\tcalls++;\n\treturn x + calls;\n")
    result = diff(tmp_path, BASE, patched)
    assert names(result.changed) == {"count_calls"}
    assert [c.name.split(".")[0] for c in result.new_data] == ["calls"]  # the ELF name: calls.<n>
    assert not result.refused


def test_new_global_variable_is_new_data(tmp_path: Path) -> None:
    patched = patch(BASE, "int counter_table[4]", "int patched_hits;\nint counter_table[4]")
    patched = patch(patched, "\treturn x + 1;\n", "\tpatched_hits++;\n\treturn x + 1;\n")
    result = diff(tmp_path, BASE, patched)
    assert names(result.new_data) == {"patched_hits"}
    assert "global variable patched_hits" in result.new_data[0].reason
    assert names(result.changed) == {"count_calls"} and not result.refused


def test_changed_initializer_of_static_global_is_refused(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, patch(BASE, "static int limit = 10;", "static int limit = 20;"))
    reason = refusal(result, "limit")
    assert "static variable limit" in reason and "initial value" in reason


def test_changed_size_of_global_is_refused(tmp_path: Path) -> None:
    patched = patch(BASE, "int counter_table[4] = {1, 2, 3, 4};", "int counter_table[8] = {1, 2, 3, 4};")
    assert "from 16 to 32 bytes" in refusal(diff(tmp_path, BASE, patched), "counter_table")


def test_changed_local_constant_travels_with_its_users(tmp_path: Path) -> None:
    # greet's code and relocations are identical; only the constant it reads differs. The constant is
    # file-local, so the update carries a new copy and greet with it.
    result = diff(tmp_path, BASE, patch(BASE, '"hello"', '"howdy"'))
    assert names(result.new_data) == {"greeting"}
    assert names(result.changed) == {"greet"}
    assert "greeting" in result.changed[0].reason
    assert not result.refused


def test_changed_init_function_is_refused(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, patch(BASE, "setting up", "setting up, patched"))
    assert refusal(result, "setup_thing").startswith("__init")
    assert "setup_thing" not in names(result.changed)


def test_changed_notrace_function_is_refused(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, patch(BASE, "return x * 5;", "return x * 6;"))
    assert "not traceable (notrace)" in refusal(result, "fast_path")
    assert "it is global" in refusal(result, "fast_path")
    assert not result.changed


NOTRACE_STATIC = """\
extern int work(int);

/* The kernel's "inline" means notrace too: gcc may still emit such a helper out of line. */
static __attribute__((noinline, no_instrument_function)) int slow_helper(int x)
{
\treturn work(x) * 3;
}

int user_a(int x)
{
\treturn slow_helper(x) + 1;
}

int user_b(int x)
{
\treturn slow_helper(x + 1);
}

int bystander(int x)
{
\treturn work(x);
}
"""


def test_changed_untraceable_static_is_copied_and_its_callers_replaced(tmp_path: Path) -> None:
    result = diff(tmp_path, NOTRACE_STATIC, patch(NOTRACE_STATIC, "work(x) * 3", "work(x) * 4"))
    assert names(result.new) == {"slow_helper"}
    assert "not traceable (notrace), so the update carries its own copy" in result.new[0].reason
    assert names(result.changed) == {"user_a", "user_b"}
    assert "calls slow_helper" in result.changed[0].reason
    assert result.unchanged == ["bystander"] and not result.refused


def test_changed_untraceable_static_with_its_address_in_data_is_refused(tmp_path: Path) -> None:
    source = NOTRACE_STATIC + "int (*const helper_ops[])(int) = { slow_helper };\n"
    result = diff(tmp_path, source, patch(source, "work(x) * 3", "work(x) * 4"))
    assert "data points to it: helper_ops" in refusal(result, "slow_helper")


def test_change_in_cold_part_changes_its_parent(tmp_path: Path) -> None:
    result = diff(tmp_path, BASE, patch(BASE, "bad value %d from %d", "value %d from %d is bad"))
    assert names(result.changed) == {"checked"}
    assert "checked.cold" in result.changed[0].reason


def test_line_shift_is_no_change_after_line_stabilisation(tmp_path: Path) -> None:
    shifted = patch(BASE, "int line_user(int x)", "/*\n * A comment the patch adds.\n */\n\nint line_user(int x)")
    raw = diff(tmp_path / "raw", BASE, shifted, stabilise=False)
    assert names(raw.changed) == {"line_user"}  # __LINE__ moved: the raw diff sees it
    stable = diff(tmp_path / "stable", BASE, shifted)
    assert (stable.changed, stable.new, stable.refused) == ([], [], [])


JUMP_LABEL = """\
struct static_key { int enabled; };
struct static_key key_a, key_b;
extern int printk(const char *fmt, ...);

#define key_on(key) ({ \\
\tint __on = 0; \\
\tasm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\\n\\t" \\
\t\t ".pushsection __jump_table, \\"aw\\"\\n\\t" \\
\t\t ".balign 8\\n\\t" \\
\t\t ".long 1b - ., %l[l_yes] - .\\n\\t" \\
\t\t ".quad %c0 - .\\n\\t" \\
\t\t ".popsection\\n\\t" : : "i"(key) : : l_yes); \\
\tif (0) { l_yes: __on = 1; } \\
\t__on; })

int first_user(int x)
{
\tif (key_on(&key_a))
\t\treturn printk("first %d\\n", x);
\treturn x;
}

int second_user(int x)
{
\tif (key_on(&key_a))
\t\treturn printk("second %d\\n", x);
\treturn x + 1;
}
"""


def test_jump_table_entries_travel_with_changed_functions(tmp_path: Path) -> None:
    info = compile_c(tmp_path / "info", JUMP_LABEL)
    assert "__jump_table" in info.special_sections
    assert {e.function for e in info.tables["__jump_table"]} == {"first_user", "second_user"}
    result = diff(tmp_path, JUMP_LABEL, patch(JUMP_LABEL, '"first %d', '"first, patched %d'))
    assert names(result.changed) == {"first_user"}
    assert [(s.section, s.function, s.entries) for s in result.special] == [("__jump_table", "first_user", 1)]
    assert not result.refused


def test_jump_table_change_of_unchanged_function_is_refused(tmp_path: Path) -> None:
    # second_user's code is byte-identical (the site is a NOP), but its static key is another one.
    patched = patch(JUMP_LABEL, "if (key_on(&key_a))\n\t\treturn printk(\"second",
                    "if (key_on(&key_b))\n\t\treturn printk(\"second")
    result = diff(tmp_path, JUMP_LABEL, patched)
    assert "__jump_table entries of second_user changed" in refusal(result, "second_user")


CPU_FEATURES = STATIC_CPU_HAS + """
extern int printk(const char *fmt, ...);

int first(int x)
{
\tif (static_cpu_has(4 * 32 + 31))
\t\treturn printk("first %d\\n", x);
\treturn x;
}

int second(int x)
{
\tif (static_cpu_has(1 * 32 + 5))
\t\treturn printk("second %d\\n", x);
\treturn x + 1;
}
"""


@pytest.mark.parametrize("changed, old, new, entries", [
    # A second feature test in first() grows .altinstr_replacement and .altinstr_aux in front of
    # second()'s pieces: second()'s entries and its jump into .altinstr_aux point elsewhere, to the
    # same code.
    ("first", "\tif (static_cpu_has(4 * 32 + 31))\n",
     "\tif (static_cpu_has(4 * 32 + 31) && !static_cpu_has(9 * 32 + 16))\n", 4),
    # first()'s empty replacement shares its offset with second()'s jump: a call before second()'s
    # test moves the labels that jump goes to, which is no change of first().
    ("second", "\tif (static_cpu_has(1 * 32 + 5))\n", "\tprintk(\"before\");\n\tif (static_cpu_has(1 * 32 + 5))\n", 2),
])
def test_alternatives_that_only_moved_are_no_change(tmp_path: Path, changed: str, old: str, new: str,
                                                    entries: int) -> None:
    result = diff(tmp_path, CPU_FEATURES, patch(CPU_FEATURES, old, new))
    assert names(result.changed) == {changed} and result.unchanged == sorted({"first", "second"} - {changed})
    assert not result.refused
    assert [(s.section, s.function, s.entries) for s in result.special] == [(".altinstructions", changed, entries)]


def test_another_cpu_feature_is_a_change(tmp_path: Path) -> None:
    # Only the feature bit differs: in the run-time test (.altinstr_aux) and in the entry's cpuid.
    result = diff(tmp_path, CPU_FEATURES, patch(CPU_FEATURES, "static_cpu_has(1 * 32 + 5)",
                                                "static_cpu_has(1 * 32 + 6)"))
    assert names(result.changed) == {"second"} and not result.refused


DESCRIPTORS = """\
struct desc { const char *func; const char *fmt; unsigned int line; };
extern int describe(struct desc *d, int x);

#define PASTE_(a, b) a##b
#define PASTE(a, b) PASTE_(a, b)
/* Like pr_debug: a file-local descriptor per call site, named with __COUNTER__. */
#define DEBUG_AT(fmt, x) DEBUG_AT_(PASTE(__UNIQUE_ID_ddebug, __COUNTER__), fmt, x)
#define DEBUG_AT_(id, fmt, x) ({ \\
\tstatic struct desc id __attribute__((section("__dyndbg"))) = { __func__, fmt, __LINE__ }; \\
\tdescribe(&id, x); })

int dd_one(int x)
{
\treturn DEBUG_AT("one %d", x);
}

int dd_two(int x)
{
\treturn DEBUG_AT("two %d", x);
}
"""


def test_descriptor_names_survive_a_counter_shift(tmp_path: Path) -> None:
    # The added call site takes a __COUNTER__ value, so dd_two's descriptor gets another ELF name;
    # its key (owner/base) is the same and dd_two is unchanged. dd_one's new descriptor travels with it.
    patched = patch(DESCRIPTORS, '\treturn DEBUG_AT("one %d", x);',
                    '\tDEBUG_AT("entering %d", x);\n\treturn DEBUG_AT("one %d", x);')
    info = compile_c(tmp_path / "info", DESCRIPTORS)
    assert {"dd_one/__UNIQUE_ID_ddebug", "dd_two/__UNIQUE_ID_ddebug", "dd_one/__func__"} <= set(info.data)
    result = diff(tmp_path, DESCRIPTORS, patched)
    assert names(result.changed) == {"dd_one"} and result.unchanged == ["dd_two"]
    assert len(result.new_data) == 1 and result.new_data[0].name.startswith("__UNIQUE_ID_ddebug")  # added site
    assert '"entering %d"' not in DESCRIPTORS and "new static variable" in result.new_data[0].reason
    assert not result.refused


def test_unknown_special_section_change_is_refused(tmp_path: Path) -> None:
    source = BASE + 'static const char info[] __attribute__((section(".modinfo"), used)) = "version=1";\n'
    result = diff(tmp_path, source, patch(source, "version=1", "version=2"))
    assert "special section .modinfo changed" in refusal(result, ".modinfo")


def test_section_policy_table() -> None:
    assert section_rule("__mcount_loc").handling is Handling.IGNORE
    assert section_rule(".orc_unwind_ip").handling is Handling.IGNORE
    assert section_rule(".discard.reachable").handling is Handling.IGNORE
    assert section_rule("__bug_table").entry_size == 12
    assert section_rule(".init.text").handling is Handling.BOOT_ONLY
    assert section_rule(".text.foo") is None and section_rule(".rodata.str1.1") is None
    assert all(r.entry_size > 0 for r in SECTION_RULES if r.handling is Handling.PER_FUNCTION)


def test_not_an_object_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not an ELF file"):
        read_object(b"not an elf file at all, just text" * 4)
    with pytest.raises(BuildError, match="cannot read object"):
        read_object(tmp_path / "missing.o")


@pytest.mark.parametrize(("old", "new", "name", "code"), [
    ("static int limit = 10;", "static int limit = 20;", "limit", "changed-initialiser"),
    ("int counter_table[4] = {1, 2, 3, 4};", "int counter_table[8] = {1, 2, 3, 4};", "counter_table",
     "changed-layout"),
    ("setting up", "setting up, patched", "setup_thing", "init-exit"),
    ("return x * 5;", "return x * 6;", "fast_path", "notrace"),
])
def test_each_diff_refusal_carries_its_code(tmp_path: Path, old: str, new: str, name: str, code: str) -> None:
    """The code is set where the diff refuses, so build --to never reads it back from the message."""
    result = diff(tmp_path, BASE, patch(BASE, old, new))
    assert [r.code for r in result.refused if r.name == name] == [code]
