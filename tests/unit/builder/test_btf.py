"""BTF prototypes: rendering rules on synthesised blobs, then the real lab kernel and one of its modules."""

from __future__ import annotations

import lzma
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from dynamos.builder.btf import BtfError, BtfTypes, Param, Prototype
from dynamos.target import TargetKernel
from dynamos.target.images import extract_vmlinux

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
FUNC, FUNC_PROTO, FLOAT, ENUM64 = 12, 13, 16, 19


class Writer:
    """Just enough of a BTF writer to build test blobs; ``base`` makes it split BTF over that blob."""

    def __init__(self, base: Writer | None = None) -> None:
        self.first_id = base.first_id + len(base.types) if base else 1
        self.first_str = base.first_str + len(base.strings) if base else 0
        self.strings = bytearray() if base else bytearray(b"\0")
        self.types: list[bytes] = []

    def string(self, name: str) -> int:
        if not name:
            return 0
        self.strings += name.encode() + b"\0"
        return self.first_str + len(self.strings) - len(name) - 1

    def add(self, kind: int, name: str, size_or_type: int, vlen: int = 0, kflag: bool = False,
            extra: bytes = b"") -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack("<III", self.string(name), info, size_or_type) + extra)
        return self.first_id + len(self.types) - 1

    def integer(self, name: str, size: int, signed: bool = True) -> int:
        return self.add(INT, name, size, extra=struct.pack("<I", (int(signed) << 24) | size * 8))

    def aggregate(self, name: str, *members: tuple[str, int], union: bool = False) -> int:
        data = b"".join(struct.pack("<III", self.string(m), t, 0) for m, t in members)
        return self.add(UNION if union else STRUCT, name, 8, len(members), extra=data)

    def enum(self, name: str, size: int = 4, signed: bool = False, kind: int = ENUM) -> int:
        entry = struct.pack("<Ii", self.string("A"), -1 if signed else 1)
        return self.add(kind, name, size, 1, signed, entry + (b"\0\0\0\0" if kind == ENUM64 else b""))

    def func(self, name: str, ret: int, *params: tuple[str, int]) -> int:
        data = b"".join(struct.pack("<II", self.string(p), t) for p, t in params)
        return self.add(FUNC, name, self.add(FUNC_PROTO, "", ret, len(params), extra=data), vlen=1)

    def blob(self) -> bytes:
        types = b"".join(self.types)
        return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings)) \
            + types + bytes(self.strings)


def render(w: Writer, name: str = "f") -> str:
    return BtfTypes.from_bytes(w.blob()).prototype(name).declaration(name)


def test_integer_names_are_normalised_and_typedefs_resolved() -> None:
    w = Writer()
    names = ["long int", "long unsigned int", "long long int", "long long unsigned int", "short int",
             "short unsigned int", "_Bool", "char", "signed char", "unsigned char", "int", "unsigned int",
             "__int128", "__int128 unsigned"]
    ids = [w.integer(n, 8) for n in names]
    ssize = w.add(TYPEDEF, "ssize_t", w.add(TYPEDEF, "__kernel_ssize_t", ids[0]))
    gfp = w.add(CONST, "", w.add(TYPEDEF, "gfp_t", ids[11]))  # the parameter's own const is dropped
    w.func("f", ssize, *[(f"p{i}", t) for i, t in enumerate(ids)], ("flags", gfp))
    assert render(w) == (
        "long f(long p0, unsigned long p1, long long p2, unsigned long long p3, short p4, unsigned short p5, "
        "_Bool p6, char p7, signed char p8, unsigned char p9, int p10, unsigned int p11, __int128 p12, "
        "unsigned __int128 p13, unsigned int flags)")


def test_unknown_integer_names_fall_back_to_size_and_sign() -> None:
    w = Writer()
    u8, s16 = w.integer("u8_odd", 1, signed=False), w.integer("s16_odd", 2)
    w.func("f", u8, ("a", s16), ("b", w.integer("weird", 8, signed=False)))
    assert render(w) == "unsigned char f(short a, unsigned long b)"


def test_pointers_keep_pointee_qualifiers_and_forward_declare_structs() -> None:
    w = Writer()
    char = w.integer("char", 1)
    kiocb = w.aggregate("kiocb", ("x", char))
    page = w.add(FWD, "page", 0)
    cred = w.add(CONST, "", w.add(TYPEDEF, "cred_t", w.aggregate("cred")))
    sigval = w.add(FWD, "sigval", 0, kflag=True)  # a forward-declared union
    const_char_p = w.add(PTR, "", w.add(CONST, "", char))
    argv = w.add(PTR, "", w.add(CONST, "", const_char_p))
    w.func("f", w.add(PTR, "", w.add(PTR, "", page)),
           ("iocb", w.add(PTR, "", kiocb)), ("name", const_char_p), ("c", w.add(PTR, "", cred)),
           ("argv", argv), ("v", w.add(PTR, "", w.add(VOLATILE, "", w.integer("int", 4)))),
           ("u", w.add(PTR, "", sigval)), ("p", w.add(PTR, "", 0)))
    proto = BtfTypes.from_bytes(w.blob()).prototype("f")
    assert proto.return_type == "struct page **"
    assert [p.decl for p in proto.params] == [
        "struct kiocb *iocb", "const char *name", "const struct cred *c", "const char *const *argv",
        "volatile int *v", "union sigval *u", "void *p"]
    assert proto.forward_declarations == ("struct cred;", "struct kiocb;", "struct page;", "union sigval;")
    assert proto.declaration("d", "static").startswith("static struct page **d(struct kiocb *iocb, ")
    assert proto.argument_list() == "iocb, name, c, argv, v, u, p"


def test_enums_become_integers_of_their_size_and_sign() -> None:
    w = Writer()
    w.func("f", w.enum("e"), ("a", w.enum("s", signed=True)), ("b", w.enum("e64", 8, kind=ENUM64)),
           ("c", w.enum("small", 1)), ("d", w.add(PTR, "", w.enum("pe"))))
    assert render(w) == "unsigned int f(int a, unsigned long b, unsigned char c, unsigned int *d)"


def test_unnameable_pointees_become_void() -> None:
    w = Writer()
    anon = w.aggregate("")
    node = w.add(TYPEDEF, "Node", anon)
    callback = w.add(PTR, "", w.add(FUNC_PROTO, "", 0))
    array = w.add(PTR, "", w.add(ARRAY, "", 0, extra=struct.pack("<III", w.integer("int", 4), 0, 4)))
    w.func("f", 0, ("a", w.add(PTR, "", anon)), ("n", w.add(PTR, "", w.add(CONST, "", node))),
           ("cb", callback), ("arr", array))
    proto = BtfTypes.from_bytes(w.blob()).prototype("f")
    assert proto.declaration("f") == "void f(void *a, const void *n, void *cb, void *arr)"
    assert proto.forward_declarations == ()


@pytest.mark.parametrize(("kind", "reason", "shown"), [
    (STRUCT, "by-value struct", "(struct range)"), (UNION, "by-value union", "(union range)"),
    (FLOAT, "float", "(double)")])
def test_by_value_aggregates_and_floats_are_refused_naming_the_parameter(kind: int, reason: str, shown: str) -> None:
    w = Writer()
    bad = w.add(FLOAT, "double", 8) if kind == FLOAT else w.aggregate("range", union=kind == UNION)
    w.func("clamp", 0, ("p", w.integer("int", 4)), ("r", w.add(TYPEDEF, "range_t", bad)))
    with pytest.raises(BtfError) as e:
        BtfTypes.from_bytes(w.blob(), source="vmlinux.btf").prototype("clamp")
    assert e.value.reason == reason
    assert "cannot forward" in str(e.value) and "argument 'r' of function clamp in vmlinux.btf" in str(e.value)
    assert shown in str(e.value)


def test_by_value_return_of_an_anonymous_struct_is_refused_naming_its_typedef() -> None:
    w = Writer()
    w.func("get", w.add(TYPEDEF, "pair_t", w.aggregate("")))
    with pytest.raises(BtfError, match=r"by-value struct return value of function get in BTF data \(pair_t\)"):
        BtfTypes.from_bytes(w.blob()).prototype("get")


def test_variadic_functions_and_empty_parameter_lists() -> None:
    w = Writer()
    w.func("printk", w.integer("int", 4), ("fmt", w.add(PTR, "", w.add(CONST, "", w.integer("char", 1)))), ("", 0))
    w.func("schedule", 0)
    types = BtfTypes.from_bytes(w.blob())
    printk = types.prototype("printk")
    assert printk.variadic and printk.argument_list() == "fmt"
    assert printk.declaration("printk") == "int printk(const char *fmt, ...)"
    assert types.prototype("schedule") == Prototype("schedule", "void", (), False, ())
    assert types.prototype("schedule").declaration("d", "static") == "static void d(void)"


def test_unnamed_parameters_get_unique_argument_names() -> None:
    w = Writer()
    i = w.integer("int", 4)
    w.func("f", 0, ("", i), ("arg1", i), ("", i))
    proto = BtfTypes.from_bytes(w.blob()).prototype("f")
    assert proto.params == (Param("arg0", "int arg0"), Param("arg1", "int arg1"), Param("arg2", "int arg2"))
    w = Writer()
    w.func("g", 0, ("arg1", i := w.integer("int", 4)), ("", i))
    assert [p.name for p in BtfTypes.from_bytes(w.blob()).prototype("g").params] == ["arg1", "arg1_"]


def test_duplicates_are_deduplicated_but_different_prototypes_are_refused() -> None:
    w = Writer()
    i, long = w.integer("int", 4), w.integer("long int", 8)
    w.func("show", i, ("m", i))
    w.func("show", i, ("m", i))
    w.func("show", i, ("other_name", i))  # the same ABI: only the name differs
    w.func("probe", i, ("m", i))
    w.func("probe", i, ("m", long))
    types = BtfTypes.from_bytes(w.blob(), source="vmlinux")
    assert len(types.functions("show")) == 3
    assert types.prototype("show").declaration("show") == "int show(int m)"
    with pytest.raises(BtfError, match=r"^probe has 2 different prototypes in vmlinux: int probe\(int m\); "
                                       r"int probe\(long m\)$"):
        types.prototype("probe")
    assert types.functions("nothing") == []
    with pytest.raises(BtfError, match="^no BTF for function nothing in vmlinux$"):
        types.prototype("nothing")
    assert types.function_names() == ["probe", "show"]


def test_split_btf_continues_type_ids_and_string_offsets_of_its_base() -> None:
    base = Writer()
    kiocb_ptr = base.add(PTR, "", base.aggregate("kiocb"))
    long = base.integer("long int", 8)
    base.func("vmlinux_only", long)
    module = Writer(base)
    assert module.first_id == 6 and module.first_str == len(base.strings)
    module.func("mod_write", long, ("iocb", kiocb_ptr), ("private", module.add(PTR, "", module.aggregate("mod_priv"))))
    vmlinux = BtfTypes.from_bytes(base.blob())
    mod = BtfTypes.from_bytes(module.blob(), base=vmlinux, source="mod.ko")
    assert mod.prototype("mod_write").declaration("mod_write") == \
        "long mod_write(struct kiocb *iocb, struct mod_priv *private)"
    assert mod.function_names() == ["mod_write"]  # only the module's own functions
    with pytest.raises(BtfError, match="no BTF for function vmlinux_only in mod.ko"):
        mod.prototype("vmlinux_only")
    with pytest.raises(BtfError, match="split BTF"):
        BtfTypes.from_bytes(module.blob())


def _corrupt(how: str) -> bytes:
    w = Writer()
    if how == "unknown kind":
        w.add(25, "", 0)
    elif how == "overrun":
        w.add(STRUCT, "s", 8, vlen=3)  # promises three members, has none
    elif how == "type id":
        w.add(FUNC, "f", 99)
    elif how == "string":
        w.add(FUNC, "", w.add(FUNC_PROTO, "", 0))
        w.types[-2] = struct.pack("<III", 500, FUNC << 24, 2)
    return w.blob()


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated"), (b"\xeb\x9f\x01\x00" + bytes(20), "not little-endian BTF"),
    (b"\x9f\xeb\x01\x00" + bytes(20), "header"),
    (_corrupt("unknown kind"), "unknown BTF kind 25"), (_corrupt("overrun"), "runs past"),
    (_corrupt("type id"), "type id 99 is out of range"), (_corrupt("string"), "string offset 500"),
    (struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, 99), "outside the data")])
def test_malformed_blobs_raise_btf_errors(data: bytes, message: str) -> None:
    with pytest.raises(BtfError, match=message) as e:
        BtfTypes.from_bytes(data, source="blob").prototype("f")
    assert e.value.reason == "malformed" and str(e.value).startswith("blob")


def test_non_elf_files_raise_btf_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.ko").write_bytes(b"not an elf")
    with pytest.raises(BtfError, match="junk.ko"):
        BtfTypes.from_elf(tmp_path / "junk.ko")
    with pytest.raises(BtfError, match="missing.ko"):
        BtfTypes.from_elf(tmp_path / "missing.ko")


# -- the real lab kernel ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vmlinux(target: TargetKernel) -> BtfTypes:
    return BtfTypes.from_elf(extract_vmlinux(target))


@pytest.mark.parametrize(("name", "expected", "forwards"), [
    ("pipe_write", "long pipe_write(struct kiocb *iocb, struct iov_iter *from)", ("struct iov_iter;", "struct kiocb;")),
    ("pipe_read", "long pipe_read(struct kiocb *iocb, struct iov_iter *to)", ("struct iov_iter;", "struct kiocb;")),
    ("cmdline_proc_show", "int cmdline_proc_show(struct seq_file *m, void *v)", ("struct seq_file;",)),
    ("vfs_read", "long vfs_read(struct file *file, char *buf, unsigned long count, long long *pos)",
     ("struct file;",)),
    ("schedule", "void schedule(void)", ()),
    ("_printk", "int _printk(const char *fmt, ...)", ()),
])
def test_real_kernel_prototypes(vmlinux: BtfTypes, name: str, expected: str, forwards: tuple[str, ...]) -> None:
    proto = vmlinux.prototype(name)
    assert proto.declaration(name) == expected
    assert proto.forward_declarations == forwards


def test_real_module_prototypes_through_split_btf(vmlinux: BtfTypes, target: TargetKernel, tmp_path: Path) -> None:
    ko = target.module_path("binfmt_misc")
    mod = BtfTypes.from_elf(ko, base=vmlinux)
    assert mod.prototype("load_misc_binary").declaration("x") == "int x(struct linux_binprm *bprm)"
    assert mod.prototype("bm_status_write").declaration("x") == \
        "long x(struct file *file, const char *buffer, unsigned long count, long long *ppos)"
    with pytest.raises(BtfError, match="no BTF for function pipe_write in .*binfmt_misc"):
        mod.prototype("pipe_write")
    (tmp_path / "binfmt_misc.ko.xz").write_bytes(lzma.compress(ko.read_bytes(), format=lzma.FORMAT_XZ))
    packed = BtfTypes.from_elf(tmp_path / "binfmt_misc.ko.xz", base=vmlinux)
    assert packed.prototype("bm_status_write") == mod.prototype("bm_status_write")


def test_every_vmlinux_function_renders_or_is_refused(vmlinux: BtfTypes, target: TargetKernel,
                                                      tmp_path: Path) -> None:
    """Every refusal is a BtfError for a known reason, and everything rendered compiles, warning-free,
    in a module that includes only the three headers a dispatcher gets."""
    reasons: Counter[str] = Counter()
    rendered: list[Prototype] = []
    for name in vmlinux.function_names():
        try:
            rendered.append(vmlinux.prototype(name))
        except BtfError as e:
            reasons[e.reason] += 1
    assert set(reasons) <= {"by-value struct", "by-value union", "float", "ambiguous"}, reasons
    assert len(rendered) > 40000 and sum(reasons.values()) < len(rendered) // 20
    forwards = sorted({f for p in rendered for f in p.forward_declarations})
    lines = ["#include <linux/kernel.h>", "#include <linux/module.h>", "#include <linux/types.h>", *forwards]
    lines += [p.declaration(f"dyn_{i}", "extern") + ";" for i, p in enumerate(rendered)]
    (tmp_path / "sweep.c").write_text("\n".join([*lines, 'MODULE_LICENSE("GPL");', ""]))
    (tmp_path / "Kbuild").write_text("obj-m := sweep.o\n")
    r = subprocess.run(["make", "-C", str(target.headers_dir), f"M={tmp_path}", "modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning:" not in r.stdout + r.stderr
