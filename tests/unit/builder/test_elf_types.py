"""Type layouts read from DWARF, and whether a header change alters one: small C files compiled
with the host gcc's ``-g``, an original and a patched unit under the same file names, as the
patch builder compiles them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dynamos.builder.elf.types import (
    Member,
    TypeLayout,
    _shorten,
    compare_header_types,
    layout_changes,
    read_types,
    refuse_layout_changes,
)
from dynamos.errors import BuildError

HEADER = """\
#ifndef X_H
#define X_H
#define NAMELEN 16
#define LIMIT 4
struct req {
\tint a;
\tint b;
\tunsigned int flag:1;
\tunsigned int mode:3;
\tchar name[NAMELEN];
\tunion {
\t\tlong cookie;
\t\tvoid *owner;
\t};
};
typedef struct {
\tlong x;
} handle_t;
enum state { S_IDLE, S_BUSY };
enum { ANON_ONE = 1 };
static inline int twice(int x)
{
\treturn 2 * x;
}
#endif
"""

UNIT = """\
#include "x.h"
struct local { char buf[NAMELEN]; };
struct req r;
handle_t h;
enum state st;
struct local l;
int use(struct req *q)
{
\treturn twice(q->a) + q->mode + LIMIT;
}
"""


def compile_pair(tmp: Path, header: str, unit: str = UNIT, *, debug: str = "-g",
                 header_path: str = "x.h", original: tuple[str, str] = (HEADER, UNIT)) -> tuple[bytes, bytes]:
    """(original, patched) objects of the unit, each in its own directory under the same names."""
    objects = []
    for side, (h, u) in (("orig", original), ("patched", (header, unit))):
        d = tmp / side
        (d / header_path).parent.mkdir(parents=True, exist_ok=True)
        (d / header_path).write_text(h)
        (d / "x.c").write_text(u.replace('"x.h"', f'"{header_path}"'))
        subprocess.run(["gcc", debug, "-O2", "-c", "x.c", "-o", "x.o"], cwd=d, check=True, capture_output=True)
        objects.append((d / "x.o").read_bytes())
    return objects[0], objects[1]


def changes(tmp: Path, old: str, new: str, **kw: str) -> list[str]:
    assert old in HEADER, old
    original, patched = compile_pair(tmp, HEADER.replace(old, new, 1), **kw)
    return compare_header_types(original, patched, [kw.get("header_path", "x.h")], "x.c").changes


def test_layouts_read_from_dwarf(tmp_path: Path) -> None:
    original, _ = compile_pair(tmp_path, HEADER)
    types = read_types(original, ["x.h"])
    assert set(types.layouts) == {"struct req", "handle_t", "enum state"}  # the bare enum is constants only
    req = types.layouts["struct req"]
    assert (req.kind, req.file, req.size) == ("struct", "x.h", 40)
    m = req.members
    assert (m["b"].offset, m["b"].type, m["b"].size) == (4, "int", 4)
    assert (m["mode"].bit, m["mode"].bits) == (65, 3)
    assert (m["name"].type, m["name"].size) == ("char[16]", 16)
    assert (m["cookie"].offset, m["owner"].offset, m["owner"].type) == (32, 32, "void *")  # anonymous union
    assert types.layouts["enum state"].enumerators == {"S_IDLE": 0, "S_BUSY": 1}
    assert types.layouts["handle_t"].members["x"].type == "long int"
    assert types.sizes["struct local"] == (16, "x.c")  # declared elsewhere: by size


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("\tint b;\n", "\tint b;\n\tint c;\n", ["struct req", "member c added at offset 8",
                                            "member name moved from offset 9 to 13",
                                            "member mode moved from bit 65 width 3 to bit 97 width 3"]),
    ("\tint a;\n\tint b;\n", "\tint b;\n\tint a;\n", ["struct req", "member a moved from offset 0 to 4"]),
    ("\tint a;\n", "\tunsigned int a;\n", ["struct req", "member a changes type from int to unsigned int"]),
    ("\tint a;\n\tint b;\n", "\tlong a;\n", ["struct req", "member b removed", "changes type from int to long int"]),
    ("mode:3", "mode:4", ["struct req", "member mode changes width from 3 bits to 4 bits"]),
    ("flag:1;\n", "flag:1;\n\tunsigned int more:1;\n", ["member more added at bit 65",
                                                        "member mode moved from bit 65 width 3 to bit 66 width 3"]),
    ("S_IDLE, S_BUSY", "S_IDLE, S_NEW, S_BUSY", ["enum state", "enumerator S_BUSY changes value from 1 to 2"]),
    ("\tlong x;\n} handle_t", "\tint x;\n} handle_t", ["handle_t changes layout", "size 8 -> 4"]),
    ("\t\tvoid *owner;\n", "\t\tvoid *owner;\n\t\tchar tag[12];\n", ["member tag added", "size 40 -> 48"]),
])
def test_a_changed_layout_is_refused_naming_the_type(tmp_path: Path, old: str, new: str, expected: list[str]) -> None:
    [message] = changes(tmp_path, old, new)
    assert message.startswith("x.h: ") and " changes layout: " in message, message
    for part in expected:
        assert part in message, message


def test_a_macro_that_sizes_a_type_declared_elsewhere(tmp_path: Path) -> None:
    found = changes(tmp_path, "#define NAMELEN 16", "#define NAMELEN 24")
    assert any(m.startswith("x.h: struct req changes layout: member name changes type from char[16] to char[24]")
               for m in found), found
    assert any(m.startswith("x.c: struct local changes layout: size 16 -> 24") for m in found), found


@pytest.mark.parametrize(("old", "new"), [
    ("\treturn 2 * x;\n", "\treturn 3 * x;\n"),  # a static inline function's body
    ("#define LIMIT 4\n", "#define LIMIT 5\n"),  # a macro no type uses
    ("\tint a;\n", "\tint a; /* the first */\n"),  # a comment inside a struct
    ("S_IDLE, S_BUSY", "S_IDLE, S_BUSY, S_DONE"),  # an enumerator added at the end
    ("ANON_ONE = 1", "ANON_ONE = 2"),  # a constant of a bare enum, like a macro
    ("#endif\n", "struct fresh { int z; };\n#endif\n"),  # a new struct (used below)
])
def test_changes_that_alter_no_layout(tmp_path: Path, old: str, new: str) -> None:
    unit = UNIT + "struct fresh f;\n" if "fresh" in new else UNIT
    original, patched = compile_pair(tmp_path, HEADER.replace(old, new, 1), unit)
    check = compare_header_types(original, patched, ["x.h"], "x.c")
    assert check.changes == [] and check.compared == 3, check
    assert check.summary() == f"types of x.h: 3 compared member by member, {check.sized} other types by size: " \
                              "no layout change"


def test_dwarf4_bit_fields_and_a_header_found_through_its_directory(tmp_path: Path) -> None:
    found = changes(tmp_path, "mode:3", "mode:5", debug="-gdwarf-4", header_path="include/linux/x.h")
    assert found == ["include/linux/x.h: struct req changes layout: member mode changes width from 3 bits "
                     "to 5 bits"], found
    original, _ = compile_pair(tmp_path / "v4", HEADER, debug="-gdwarf-4", header_path="include/linux/x.h")
    req = read_types(original, ["include/linux/x.h"]).layouts["struct req"]
    assert (req.members["flag"].bit, req.members["mode"].bit, req.members["mode"].bits) == (64, 65, 3)


def test_an_object_without_debug_information_is_refused(tmp_path: Path) -> None:
    original, patched = compile_pair(tmp_path, HEADER, debug="-g0")
    with pytest.raises(BuildError, match=r"x.c \(original\) has no DWARF type information"):
        compare_header_types(original, patched, ["x.h"], "x.c")


def test_a_long_list_of_moved_members_is_shortened_keeping_the_size() -> None:
    before = TypeLayout("struct", "struct big", "x.h", 80,
                        members={f"m{i}": Member(f"m{i}", 8 * i, "long int", 8) for i in range(10)})
    after = TypeLayout("struct", "struct big", "x.h", 88, members={
        "first": Member("first", 0, "long int", 8),
        **{f"m{i}": Member(f"m{i}", 8 * i + 8, "long int", 8) for i in range(10)}})
    found = layout_changes(before, after)
    assert found[0] == "member first added at offset 0" and found[-1] == "size 80 -> 88" and len(found) == 12
    assert _shorten(found) == [*found[:4], "7 more member changes", "size 80 -> 88"]


def test_the_builder_refuses_with_the_changed_layout_code_only_when_a_header_is_patched(tmp_path: Path) -> None:
    original, patched = compile_pair(tmp_path, HEADER.replace("\tint b;\n", "\tlong b;\n"))
    said: list[str] = []
    assert refuse_layout_changes(original, patched, ["x.c"], "x.c", said.append) == ""  # no header: not compared
    with pytest.raises(BuildError) as e:
        refuse_layout_changes(original, patched, ["x.c", "x.h"], "x.c", said.append)
    assert e.value.code == "changed-layout" and str(e.value).startswith("x.h: struct req changes layout: ")
    assert said == ["x.c: comparing the types of x.h in the original and patched objects"]


OPS = "struct ops {\n\tint (*dump)(void *skb, const void *expr);\n\tvoid (*done)(void);\n};\n"
OPS_UNIT = '#include "x.h"\nstatic int d(void *s, const void *e) { return s != e; }\nstruct ops o = { .dump = d };\n'


@pytest.mark.parametrize(("new", "expected"), [
    ("int (*dump)(void *skb, const void *expr, _Bool reset);",
     "member dump changes type from int (void *, const void *) * to int (void *, const void *, _Bool) *"),
    ("long (*dump)(void *skb, const void *expr);",
     "member dump changes type from int (void *, const void *) * to long int (void *, const void *) *"),
])
def test_a_callback_member_whose_prototype_changes_is_a_changed_type(tmp_path: Path, new: str, expected: str) -> None:
    """The running kernel's callers would call the new code with the old arguments (nft_expr_ops'
    dump gained a ``bool reset`` in a stable release): same size, other type."""
    header = OPS.replace("int (*dump)(void *skb, const void *expr);", new)
    unit = OPS_UNIT.replace("const void *e)", "const void *e, _Bool r)" if "_Bool" in new else "const void *e)")
    if new.startswith("long"):
        unit = unit.replace("static int d", "static long d")
    original, patched = compile_pair(tmp_path, header, unit, original=(OPS, OPS_UNIT))
    [message] = compare_header_types(original, patched, ["x.h"], "x.c").changes
    assert message.startswith("x.h: struct ops changes layout: ") and expected in message, message
    same = compile_pair(tmp_path / "same", OPS, OPS_UNIT, original=(OPS, OPS_UNIT))
    assert compare_header_types(*same, ["x.h"], "x.c").changes == []


FN = "int foo(int a);\n"
FN_UNIT = ('#include "x.h"\nint foo(int a) { return a + 1; }\n'
           'static int bar(int a) { return a; }\nint (*p)(int) = bar;\n')


def test_a_global_functions_changed_prototype_is_a_change_when_asked(tmp_path: Path) -> None:
    """Asked for a unit compiled with a header its other includers do not get: their calls of foo
    would pass the old arguments."""
    original, patched = compile_pair(tmp_path, "int foo(int a, _Bool b);\n",
                                     FN_UNIT.replace("int foo(int a)", "int foo(int a, _Bool b)"),
                                     original=(FN, FN_UNIT))
    [message] = compare_header_types(original, patched, ["x.h"], "x.c", prototypes=True).changes
    assert message == ("function foo changes prototype from int (int) to int (int, _Bool): the kernel's "
                       "callers in other units would call it with the old arguments"), message
    assert compare_header_types(original, patched, ["x.h"], "x.c").changes == []
    same = compile_pair(tmp_path / "same", FN, FN_UNIT.replace("a + 1", "a + 2"), original=(FN, FN_UNIT))
    assert compare_header_types(*same, ["x.h"], "x.c", prototypes=True).changes == []
