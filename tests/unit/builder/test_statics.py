"""Static locals and compiler-named data: the patched object's numbered names tied to the kernel's.

Small units compiled here like the kernel compiles them, "linked" into a fake kernel by the
fidelity tests' linker; the kernel's copies get other gcc numbers than the builder's compiles,
as a kernel built once by Debian does, and another file has namesakes of every variable.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from dynamos.builder.elf import RelocatableElf
from dynamos.builder.extract import extract_functions
from dynamos.builder.klp import KlpSymbol
from dynamos.builder.objdiff import align_statics, diff_objects, read_object
from dynamos.builder.statics import StaticLocals, base_name, carried_constant_sections, resolve_static_locals
from dynamos.errors import BuildError
from dynamos.target.modimage import module_image
from dynamos.target.symtab import SymbolTable
from tests.unit.builder.test_fidelity import check, compile_unit, link, module_of

# Initialised statics (.data): the test linker places PROGBITS sections only.
COMMON = """
extern int printk(const char *fmt, ...);
static inline __attribute__((always_inline)) int bump(void) { static int messages = 1; return ++messages; }
static int __attribute__((noinline)) counter(int x) { static int count = 3; count += x; return count; }
"""
OTHER = COMMON + 'int other_user(int x) { printk("%s %d\\n", __func__, bump()); return counter(x) + 1; }\n'
UNIT = COMMON + """
int user1(int x) { printk("%s %d\\n", __func__, bump()); return counter(x) + 1; }
int user2(int x)
{
\tprintk("%s %d\\n", __func__, bump());
\tswitch (x) { case 0: return 11; case 1: return 27; case 2: return 33; case 3: return 4; case 4: return 91; }
\treturn 0;
}
"""
# The fix calls a new function with a static of its own: gcc numbers every static anew.
PATCHED = UNIT.replace("static inline", "static int __attribute__((noinline)) fresh(int x) { static int hits = 2; "
                       "return hits += x; }\nstatic inline", 1).replace("count += x", "count += fresh(x)") \
              .replace("case 4: return 91;", "case 4: return 92;")


def renumbered(symtab: SymbolTable, names: dict[str, str], after: int) -> SymbolTable:
    """The table with the symbols at or above ``after`` (one file's) renamed: the kernel's numbers."""
    return SymbolTable(s._replace(name=names.get(s.name, s.name)) if s.addr >= after else s for s in symtab.symbols)


def named(obj: bytes, base: str) -> str:
    found = [s.name for s in RelocatableElf.parse(obj).symbols if base_name(s.name) == base and s.name != base]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("statics")
    return {"other": compile_unit(d / "o", "other", OTHER, sections=False),
            "whole": compile_unit(d / "w", "unit", UNIT, sections=False),
            "original": compile_unit(d / "a", "unit", UNIT), "patched": compile_unit(d / "p", "unit", PATCHED)}


@pytest.fixture(scope="module")
def kernel(objects: dict[str, bytes]):
    text, symtab = link([objects["other"], objects["whole"]])
    start = symtab.lookup("user1")[0].addr  # the unit's part of the image starts with its code
    kernel_names = {named(objects["whole"], "messages"): "messages.17", named(objects["whole"], "count"): "count.23"}
    return text, renumbered(symtab, kernel_names, start)


def test_numbers_differ_between_the_compiles(objects: dict[str, bytes]) -> None:
    assert named(objects["original"], "count") != named(objects["patched"], "count")


def test_variables_with_state_are_the_kernels_copies_whatever_their_numbers(objects, kernel) -> None:
    report = check(objects["original"], kernel)
    assert report.ok, report.summary()
    statics = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(objects["patched"]),
                                    report.data_addresses, kernel[1])
    messages, count = named(objects["patched"], "messages"), named(objects["patched"], "count")
    assert statics.lookup(messages) == KlpSymbol("messages.17", "vmlinux", 0)
    assert statics.lookup(count) == KlpSymbol("count.23", "vmlinux", 0)
    assert "the address the matched code uses" in statics.how[count]
    assert not statics.refused
    # Compiler constants are not looked up: the update carries them.
    assert not any(base_name(n) in ("__func__", "CSWTCH") for n in statics.found)


def test_a_kernel_symbol_named_like_this_compiles_local_is_not_trusted(objects, kernel) -> None:
    """The other file's count is called what this compile calls its own: a unique name, yet not
    this file's variable. The fidelity check places it only from what matched."""
    text, symtab = kernel
    ours, theirs = named(objects["original"], "count"), named(objects["other"], "count")
    table = SymbolTable(s._replace(name=ours) if s.name == theirs else s for s in symtab.symbols)
    assert len(table.lookup(ours)) == 1
    report = check(objects["original"], (text, table))
    assert report.ok, "\n".join(f.describe() for f in report.mismatches)
    assert report.data_addresses[ours] == table.lookup("count.23")[0].addr != table.lookup(ours)[0].addr


def test_a_unique_base_name_is_found_without_an_address(objects, kernel) -> None:
    symtab = SymbolTable(s for s in kernel[1].symbols if s.name != named(objects["other"], "count"))
    statics = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(objects["patched"]),
                                    {}, symtab)
    assert statics.lookup(named(objects["patched"], "count")) == KlpSymbol("count.23", "vmlinux", 0)


# The file's own variables around messages place it without an address of its own.
BRACKETED = COMMON.replace("static inline", "static int first_state = 5;\nstatic inline") \
    .replace("static int __attribute__((noinline)) counter", "static int last_state = 6;\n"
             "static int __attribute__((noinline)) counter") + """
int user1(int x) { printk("%s %d\\n", __func__, bump()); first_state += x; last_state -= x; return counter(x) + 1; }
"""


def test_a_variable_between_the_files_others_is_the_files(objects, tmp_path: Path) -> None:
    whole = compile_unit(tmp_path / "w", "unit", BRACKETED, sections=False)
    original = compile_unit(tmp_path / "a", "unit", BRACKETED)
    patched = compile_unit(tmp_path / "p", "unit", BRACKETED.replace("+ 1; }", "+ 2; }"))
    text, symtab = link([objects["other"], whole])
    report = check(original, (text, symtab))
    messages = named(original, "messages")
    addresses = {n: a for n, a in report.data_addresses.items() if n != messages}
    assert symtab.lookup(messages)  # gcc numbered both files' alike here; the address still decides
    statics = resolve_static_locals("unit.c", read_object(original), read_object(patched), addresses, symtab)
    assert len([s for s in symtab.symbols if base_name(s.name) == "messages"]) == 2  # other.c has one too
    kernel = next(s for s in symtab.symbols if s.addr == report.data_addresses[messages])
    found = statics.lookup(named(patched, "messages"))
    assert found is not None and (found.name, found.object) == (kernel.name, "vmlinux")
    assert "between the file's other .data variables" in statics.how[named(patched, "messages")]


def test_an_ambiguous_variable_is_refused_naming_it_and_its_users(objects, kernel) -> None:
    statics = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(objects["patched"]),
                                    {}, kernel[1])
    with pytest.raises(BuildError, match=r"unit.c: static variable messages \(messages\.\d+, used by user1, user2\)"
                                         r".* 2 local variables called messages"):
        statics.lookup(named(objects["patched"], "messages"))
    absent = SymbolTable(s for s in kernel[1].symbols if base_name(s.name) != "count")
    gone = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(objects["patched"]),
                                 {}, absent)
    with pytest.raises(BuildError, match=r"static variable count .*used by counter.*has no such variable"):
        gone.lookup(named(objects["patched"], "count"))
    assert StaticLocals().lookup("anything.1") is None


def test_in_a_module_the_sympos_tells_the_same_named_copies_apart(objects, tmp_path: Path) -> None:
    # Another file of the module built from the same pattern: its statics have the very same names.
    twin = compile_unit(tmp_path / "t", "twin", UNIT.replace("user", "twin_user"), sections=False)
    symtab, text = module_image(module_of(tmp_path, [twin, objects["whole"]]), "m")
    report = check(objects["original"], (text, symtab), against="module m")
    assert report.ok, report.summary()
    statics = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(objects["patched"]),
                                    report.data_addresses, symtab, "m")
    kernel_count = named(objects["whole"], "count")
    assert named(twin, "count") == kernel_count
    assert statics.lookup(named(objects["patched"], "count")) == KlpSymbol(kernel_count, "m", 2)
    messages = named(objects["whole"], "messages")
    assert statics.lookup(named(objects["patched"], "messages")) == KlpSymbol(messages, "m", 2)


def test_compiler_constants_travel_with_the_changed_function(objects) -> None:
    patched = objects["patched"]
    obj = RelocatableElf.parse(patched)
    carried = {obj.sections[i].name for i in carried_constant_sections(obj)}
    assert any("__func__" in n for n in carried) and any("CSWTCH" in n for n in carried), carried
    assert not any("count" in n or "messages" in n for n in carried)
    statics = resolve_static_locals("unit.c", read_object(objects["original"]), read_object(patched),
                                    {named(objects["original"], "messages"): 0}, SymbolTable([]))
    asked = []

    def resolve(name: str, local: bool) -> KlpSymbol | None:
        asked.append(name)
        if local:
            return statics.found.get(name) or KlpSymbol(name, "vmlinux", 1)
        return None

    e = extract_functions(patched, {"user2"}, set(), resolve)
    assert not any(base_name(n) in ("__func__", "CSWTCH") for n in asked), asked
    symbols = ELFFile(io.BytesIO(e.object)).get_section_by_name(".symtab")
    defined = {s.name for s in symbols.iter_symbols() if s["st_shndx"] != "SHN_UNDEF"}
    assert any(n.startswith("__func__.") for n in defined) and any(n.startswith("CSWTCH.") for n in defined)


SECOND = """
static int __attribute__((noinline)) counter(int x) { static int count = 3; count += x; return count; }
int user1(int x) { return counter(x) + 1; }
"""
# The fix adds a second `static int count` in a new function: the first one's key turns from
# `count` into `counter/count`, yet it is the same variable with the kernel's state.
SECOND_PATCHED = SECOND.replace(
    "int user1", "int __attribute__((noinline)) fresh(int x) { static int count = 9; return count += x; }\nint user1"
).replace("counter(x) + 1", "counter(x) + fresh(x)")


@pytest.mark.parametrize("direction", ["added", "removed"])
def test_a_static_whose_key_changed_is_not_new_data(tmp_path: Path, direction: str) -> None:
    before, after = (SECOND, SECOND_PATCHED) if direction == "added" else (SECOND_PATCHED, SECOND)
    original = read_object(compile_unit(tmp_path / "a", "u", before))
    patched = read_object(compile_unit(tmp_path / "p", "u", after))
    assert ("count" in original.data) != ("count" in patched.data)  # the keys differ
    diff = diff_objects(original, patched)
    assert [c.name for c in diff.changed] == ["user1"]  # counter itself did not change
    fresh = [patched.data["fresh/count"].symbol] if direction == "added" else []
    assert [c.name for c in diff.new_data] == fresh  # only the new function's count is new
    if direction == "added":
        aligned = align_statics(original, patched)
        kernel_count = original.data["count"].symbol
        symtab = SymbolTable.parse(f"ffffffff82000000 d {kernel_count}\n")
        statics = resolve_static_locals("u.c", original, aligned, {}, symtab)
        counter_count = next(i.symbol for i in aligned.data.values() if statics.users.get(i.symbol) == {"counter"})
        assert statics.lookup(counter_count) == KlpSymbol(kernel_count, "vmlinux", 0)


# mutex_init and spin_lock_init with lockdep off: a static key of size zero per call site, which
# the kernel's symbol table does not list.
EMPTY_KEY = """
struct lock_class_key { };
extern void init_lock(int *lock, const char *name, struct lock_class_key *key);
#define lock_init(l) do { static struct lock_class_key __key; init_lock((l), #l, &__key); } while (0)
int setup(int *l) { lock_init(l); return 1; }
"""


def test_a_static_of_size_zero_travels_with_the_update(tmp_path: Path) -> None:
    original = compile_unit(tmp_path / "a", "unit", EMPTY_KEY)
    patched = compile_unit(tmp_path / "p", "unit", EMPTY_KEY.replace("return 1;", "return 2;"))
    statics = resolve_static_locals("unit.c", read_object(original), read_object(patched), {}, SymbolTable([]))
    key = named(patched, "__key")
    assert statics.stateless == {key} and not statics.refused and statics.lookup(key) is None

    def resolve(name: str, local: bool) -> KlpSymbol | None:
        assert name != key, "a carried variable is never looked up in the kernel"
        return None if not local else KlpSymbol(name, "vmlinux", 0)

    e = extract_functions(patched, {"setup"}, statics.stateless, resolve)
    symbols = ELFFile(io.BytesIO(e.object)).get_section_by_name(".symtab")
    assert key in {s.name for s in symbols.iter_symbols() if s["st_shndx"] != "SHN_UNDEF"}
