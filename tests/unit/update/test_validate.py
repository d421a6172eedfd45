"""Update sources: a good update.toml loads, and every bad one is refused with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos.errors import UpdateSourceError
from dynamos.update.model import UPDATE_TOML, FunctionSpec, SymbolSpec, UpdateSource
from dynamos.update.validate import compiled_update_source, load_update_source

EDITION_C = """\
#include <linux/seq_file.h>

int cmdline_proc_show_v2(struct seq_file *m, void *v)
{
\tseq_puts(m, "patched\\n");
\treturn 0;
}
"""

# Line 1 is "[update]": tests below count lines from here.
MINIMAL = """\
[update]
name = "cmdline-banner"
description = "Print a banner in /proc/cmdline"

[[function]]
name = "cmdline_proc_show"
edition = "cmdline_proc_show_v2"
"""


def make_source(tmp_path: Path, toml: str | None, c_files: dict[str, str] | None = None) -> Path:
    """An update source directory with the given update.toml and C files."""
    directory = tmp_path / "src"
    directory.mkdir()
    if toml is not None:
        (directory / UPDATE_TOML).write_text(toml)
    for name, text in (c_files if c_files is not None else {"edition.c": EDITION_C}).items():
        (directory / name).write_text(text)
    return directory


def load_error(tmp_path: Path, toml: str | None, c_files: dict[str, str] | None = None) -> UpdateSourceError:
    directory = make_source(tmp_path, toml, c_files)
    with pytest.raises(UpdateSourceError) as info:
        load_update_source(directory)
    return info.value


# --- good update.toml --------------------------------------------------------------------------


def test_minimal_update_toml_loads_with_defaults(tmp_path: Path) -> None:
    directory = make_source(tmp_path, MINIMAL)
    src = load_update_source(directory)
    assert isinstance(src, UpdateSource)
    assert src.directory == directory
    assert src.toml_path == directory / UPDATE_TOML
    assert src.name == "cmdline-banner"
    assert src.livepatch_name == "cmdline_banner"
    assert src.description == "Print a banner in /proc/cmdline"
    assert src.kernel is None
    assert src.replace is False
    assert src.functions == (
        FunctionSpec(name="cmdline_proc_show", edition="cmdline_proc_show_v2", object="vmlinux", line=5),
    )
    assert src.c_files == (directory / "edition.c",)
    assert src.objects == ("vmlinux",)


def test_full_update_toml_with_every_key(tmp_path: Path) -> None:
    toml = """\
# A banner for /proc/cmdline.
[update]
name = "banner_2"
description = \"\"\"
Multi-line description.
name = "not-a-key"
\"\"\"
kernel = "6.1.0-56-amd64"
replace = true

[[function]]   # the one function
name = "cmdline_proc_show"
edition = "cmdline_proc_show_v2"
object = "vmlinux"
sympos = 2
"""
    src = load_update_source(make_source(tmp_path, toml))
    assert src.name == "banner_2"
    assert src.livepatch_name == "banner_2"
    assert src.description.strip().startswith("Multi-line description.")
    assert src.kernel == "6.1.0-56-amd64"
    assert src.replace is True
    assert src.functions == (
        FunctionSpec("cmdline_proc_show", "cmdline_proc_show_v2", "vmlinux", sympos=2, line=11),
    )


def test_several_functions_across_objects_and_files(tmp_path: Path) -> None:
    toml = """\
[update]
name = "multi"
description = "three functions, two objects"

[[function]]
name = "cmdline_proc_show"
edition = "cmdline_proc_show_v2"

[[function]]
name = "ext4_fill_super"
edition = "ext4_fill_super_v2"
object = "ext4"

[[function]]
name = "nf_conntrack_in"
edition = "nf_conntrack_in_v2"
object = "nf-conntrack"
sympos = 1
"""
    more = """\
/* a module's functions; the edition below is written K&R-free across lines */
#include <linux/fs.h>

static int helper(int x) { return x; }

int __attribute__((noinline))
ext4_fill_super_v2(struct super_block *sb,
\t\t   void *data, int silent)
{
\treturn helper(silent);
}

unsigned int nf_conntrack_in_v2(struct sk_buff *skb, const struct nf_hook_state *state) { return 1; }
"""
    directory = make_source(tmp_path, toml, {"b_modules.c": more, "a_vmlinux.c": EDITION_C})
    src = load_update_source(directory)
    assert [(f.name, f.edition, f.object, f.sympos, f.line) for f in src.functions] == [
        ("cmdline_proc_show", "cmdline_proc_show_v2", "vmlinux", None, 5),
        ("ext4_fill_super", "ext4_fill_super_v2", "ext4", None, 9),
        # the kernel names module nf-conntrack "nf_conntrack": livepatch matches on that name
        ("nf_conntrack_in", "nf_conntrack_in_v2", "nf_conntrack", 1, 14),
    ]
    assert src.objects == ("vmlinux", "ext4", "nf_conntrack")
    assert src.c_files == (directory / "a_vmlinux.c", directory / "b_modules.c")


def test_same_function_in_different_objects_or_positions_is_fine(tmp_path: Path) -> None:
    toml = """\
[update]
name = "twins"
description = "same name, different symbols"

[[function]]
name = "show"
edition = "show_a"
sympos = 1

[[function]]
name = "show"
edition = "show_b"
sympos = 2

[[function]]
name = "show"
edition = "show_c"
object = "some_module"
"""
    c = "int show_a(void) { return 1; }\nint show_b(void) { return 2; }\nint show_c(void) { return 3; }\n"
    src = load_update_source(make_source(tmp_path, toml, {"show.c": c}))
    assert [f.edition for f in src.functions] == ["show_a", "show_b", "show_c"]


def test_function_tables_written_inline_get_the_key_line(tmp_path: Path) -> None:
    toml = """\
function = [{ name = "cmdline_proc_show", edition = "cmdline_proc_show_v2" }]
[update]
name = "inline"
description = "function given as an inline array"
"""
    src = load_update_source(make_source(tmp_path, toml))
    assert src.functions[0].line == 1


def test_dotted_keys_get_their_line(tmp_path: Path) -> None:
    toml = """\
update.name = "dotted"
update.description = "keys written with dots"
update.replace = "no"
[[function]]
name = "cmdline_proc_show"
edition = "cmdline_proc_show_v2"
"""
    err = load_error(tmp_path, toml)
    assert "replace must be a boolean" in err.message
    assert err.line == 3


# --- bad update.toml: file level ----------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UpdateSourceError) as info:
        load_update_source(tmp_path / "nowhere")
    assert info.value.path == tmp_path / "nowhere"
    assert "not a directory" in info.value.message
    assert info.value.line is None


def test_missing_update_toml(tmp_path: Path) -> None:
    err = load_error(tmp_path, None)
    assert err.message == "no update.toml in update source"
    assert err.path == tmp_path / "src"
    assert err.line is None
    assert err.exit_status == 2


def test_toml_syntax_error_carries_tomllib_line(tmp_path: Path) -> None:
    toml = MINIMAL.replace('description = "Print', "description = Print")
    err = load_error(tmp_path, toml)
    assert err.path == tmp_path / "src" / UPDATE_TOML
    assert err.line == 3
    assert err.message.startswith("invalid TOML: ")
    assert "at line" not in err.message  # the line is in err.line, not repeated
    assert str(err).startswith(f"{tmp_path / 'src' / UPDATE_TOML}:3: invalid TOML")


def test_toml_duplicate_table_is_a_syntax_error(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '[update]\nname = "again"\n')
    assert err.message.startswith("invalid TOML")
    assert err.line == 8


def test_update_toml_not_utf8(tmp_path: Path) -> None:
    directory = make_source(tmp_path, None)
    (directory / UPDATE_TOML).write_bytes(MINIMAL.encode().replace(b"banner in", b"banner \xff in"))
    with pytest.raises(UpdateSourceError) as info:
        load_update_source(directory)
    assert "not UTF-8" in info.value.message
    assert info.value.line == 3


def test_no_c_files(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL, c_files={"edition.h": EDITION_C})
    assert err.path == tmp_path / "src"
    assert err.line is None
    assert "no .c files" in err.message


# --- bad update.toml: [update] ------------------------------------------------------------------


def test_missing_update_table(tmp_path: Path) -> None:
    toml = MINIMAL.split("\n\n", 1)[1]
    err = load_error(tmp_path, toml)
    assert err.path == tmp_path / "src" / UPDATE_TOML
    assert "missing [update] table" in err.message
    assert err.line is None


def test_update_not_a_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'update = "cmdline-banner"\n' + MINIMAL.split("\n\n", 1)[1])
    assert "update must be a table" in err.message
    assert err.line == 1


def test_missing_name_points_at_update_header(tmp_path: Path) -> None:
    toml = "# header comment\n" + MINIMAL.replace('name = "cmdline-banner"\n', "")
    err = load_error(tmp_path, toml)
    assert err.message == "[update]: missing required key 'name'"
    assert err.line == 2


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Banner", "must start with a lowercase letter"),
        ("2fast", "must start with a lowercase letter"),
        ("-dash", "must start with a lowercase letter"),
        ("", "must not be empty"),
        ("has space", "may only hold a-z, 0-9, '_' and '-' (found ' ')"),
        ("dots.and/slash", "may only hold a-z, 0-9, '_' and '-' (found './')"),
        ("camelCase", "may only hold a-z, 0-9, '_' and '-' (found 'C')"),
        ("a" * 56, "is 56 characters; a module name holds at most 55"),
    ],
)
def test_invalid_update_name(tmp_path: Path, name: str, why: str) -> None:
    err = load_error(tmp_path, MINIMAL.replace('"cmdline-banner"', f'"{name}"'))
    assert err.message == f"[update] name {name!r} {why}"
    assert err.line == 2


def test_longest_name_is_accepted(tmp_path: Path) -> None:
    src = load_update_source(make_source(tmp_path, MINIMAL.replace('"cmdline-banner"', f'"{"a" * 55}"')))
    assert len(src.livepatch_name) == 55


def test_name_wrong_type(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('"cmdline-banner"', "42"))
    assert err.message == "[update]: name must be a string, got integer 42"
    assert err.line == 2


def test_missing_description(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('description = "Print a banner in /proc/cmdline"\n', ""))
    assert err.message == "[update]: missing required key 'description'"
    assert err.line == 1


def test_blank_description(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('"Print a banner in /proc/cmdline"', '"   "'))
    assert err.message == "[update] description must not be empty"
    assert err.line == 3


def test_description_with_nul(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('"Print a banner', '"Print\\u0000 a banner'))
    assert err.message == "[update] description must not contain NUL characters"
    assert err.line == 3


def test_replace_must_be_boolean(tmp_path: Path) -> None:
    toml = MINIMAL.replace("\n\n", '\nreplace = "yes"\n\n', 1)
    err = load_error(tmp_path, toml)
    assert err.message == "[update] replace must be a boolean (true or false), got string 'yes'"
    assert err.line == 4


@pytest.mark.parametrize("kernel", ["latest", "6", "v6.1.0", "6.1.0 amd64", "6.1/../x", "6." + "1" * 70])
def test_kernel_must_look_like_a_release(tmp_path: Path, kernel: str) -> None:
    toml = MINIMAL.replace("\n\n", f'\nkernel = "{kernel}"\n\n', 1)
    err = load_error(tmp_path, toml)
    assert err.message.startswith(f"[update] kernel {kernel!r} does not look like a kernel release")
    assert err.line == 4


@pytest.mark.parametrize("kernel", ["6.1.0-56-amd64", "6.8.0-rc3+", "5.15.0", "6.1.0-13-cloud-amd64"])
def test_kernel_releases_accepted(tmp_path: Path, kernel: str) -> None:
    toml = MINIMAL.replace("\n\n", f'\nkernel = "{kernel}"\n\n', 1)
    assert load_update_source(make_source(tmp_path, toml)).kernel == kernel


def test_kernel_wrong_type(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace("\n\n", "\nkernel = 6.1\n\n", 1))
    assert err.message == "[update]: kernel must be a string, got float 6.1"
    assert err.line == 4


def test_unknown_key_in_update_names_it_and_suggests(tmp_path: Path) -> None:
    toml = MINIMAL.replace("description =", "descripton =")
    err = load_error(tmp_path, toml)
    assert err.message == "[update]: unknown key 'descripton' (did you mean 'description'?)"
    assert err.line == 3


def test_unknown_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace("\n\n", '\nauthor = "me"\n\n', 1))
    assert err.message == ("[update]: unknown key 'author' (allowed keys: name, description, kernel, replace, "
                           "consistency, transfer, version, cves)")
    assert err.line == 4


def test_function_array_inside_update_table(tmp_path: Path) -> None:
    toml = MINIMAL.split("\n\n", 1)[0] + '\nfunction = [{ name = "f", edition = "f_v2" }]\n'
    err = load_error(tmp_path, toml)
    assert err.message == "[update]: unknown key 'function' (functions go in their own [[function]] tables)"
    assert err.line == 4


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "\n[functions]\nname = 'x'\n")
    assert err.message == "unknown top-level key 'functions' (did you mean 'function'?)"
    assert err.line == 9


def test_key_before_first_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'name = "x"\n' + MINIMAL)
    assert "unknown top-level key 'name'" in err.message
    assert "move it under [update] or [[function]]" in err.message
    assert err.line == 1


# --- bad update.toml: [[function]] --------------------------------------------------------------


def test_no_function_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.split("\n\n", 1)[0] + "\n")
    assert err.message == "no [[function]] table: an update must replace at least one function"
    assert err.line is None


def test_function_written_as_single_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace("[[function]]", "[function]"))
    assert err.message == "function must be an array of tables: write [[function]], not [function]"
    assert err.line == 5


def test_function_array_empty(tmp_path: Path) -> None:
    err = load_error(tmp_path, "function = []\n" + MINIMAL.split("\n\n", 1)[0] + "\n")
    assert "non-empty array" in err.message
    assert err.line == 1


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("cmdline-proc-show", "is not a C identifier"),
        ("2fast", "is not a C identifier"),
        ("proc show", "is not a C identifier"),
        ("", "is not a C identifier"),
        ("int", "is a C keyword"),
    ],
)
def test_function_name_not_c_identifier(tmp_path: Path, name: str, why: str) -> None:
    err = load_error(tmp_path, MINIMAL.replace('name = "cmdline_proc_show"', f'name = "{name}"'))
    assert err.message == f"[[function]] #1: name {name!r} {why}"
    assert err.line == 6


def test_function_missing_name(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('name = "cmdline_proc_show"\n', ""))
    assert err.message == "[[function]] #1: missing required key 'name'"
    assert err.line == 5


def test_edition_missing_points_at_its_function_table(tmp_path: Path) -> None:
    toml = MINIMAL + '\n[[function]]\nname = "other"\n'
    err = load_error(tmp_path, toml)
    assert err.message == "[[function]] #2: missing required key 'edition'"
    assert err.line == 9


def test_edition_not_c_identifier(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('"cmdline_proc_show_v2"', '"show-v2"'))
    assert err.message == "[[function]] #1: edition 'show-v2' is not a C identifier"
    assert err.line == 7


def test_unknown_key_in_function(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "symbolpos = 1\n")
    assert err.message == "[[function]] #1: unknown key 'symbolpos' (did you mean 'sympos'?)"
    assert err.line == 8


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ('"1"', "string '1'"),
        ("0", "integer 0"),
        ("-3", "integer -3"),
        ("true", "boolean True"),
        ("1.0", "float 1.0"),
    ],
)
def test_sympos_must_be_positive_integer(tmp_path: Path, value: str, got: str) -> None:
    err = load_error(tmp_path, MINIMAL + f"sympos = {value}\n")
    assert err.message == (
        "[[function]] #1: sympos must be a positive integer (1 is the first of same-named symbols), "
        f"got {got}"
    )
    assert err.line == 8


@pytest.mark.parametrize("obj", ["vm linux", "ext4.ko", "", "m" * 56])
def test_object_must_be_vmlinux_or_module_name(tmp_path: Path, obj: str) -> None:
    err = load_error(tmp_path, MINIMAL + f'object = "{obj}"\n')
    assert err.message.startswith(f"[[function]] #1: object {obj!r} must be 'vmlinux' or a module name")
    assert err.line == 8


def test_same_function_patched_twice(tmp_path: Path) -> None:
    toml = MINIMAL + '\n[[function]]\nname = "cmdline_proc_show"\nedition = "other_v2"\n'
    c = EDITION_C + "int other_v2(void) { return 0; }\n"
    err = load_error(tmp_path, toml, {"e.c": c})
    assert err.message == (
        "[[function]] #2: vmlinux function 'cmdline_proc_show' is already patched by the [[function]] "
        "at line 5"
    )
    assert err.line == 9


def test_same_function_patched_twice_in_module_with_dash_and_underscore(tmp_path: Path) -> None:
    toml = (
        MINIMAL.split("\n\n", 1)[0]
        + '\n\n[[function]]\nname = "f"\nedition = "f_a"\nobject = "nf-nat"\nsympos = 2\n'
        + '\n[[function]]\nname = "f"\nedition = "f_b"\nobject = "nf_nat"\nsympos = 2\n'
    )
    err = load_error(tmp_path, toml, {"e.c": "int f_a(void) { return 0; }\nint f_b(void) { return 0; }\n"})
    assert err.message == (
        "[[function]] #2: nf_nat function 'f' sympos 2 is already patched by the [[function]] at line 5"
    )
    assert err.line == 11


def test_sympos_one_and_unset_are_the_same_function(tmp_path: Path) -> None:
    toml = MINIMAL + '\n[[function]]\nname = "cmdline_proc_show"\nedition = "other_v2"\nsympos = 1\n'
    err = load_error(tmp_path, toml, {"e.c": EDITION_C + "int other_v2(void) { return 0; }\n"})
    assert "already patched by the [[function]] at line 5" in err.message
    assert err.line == 9


def test_same_edition_for_two_functions(tmp_path: Path) -> None:
    toml = MINIMAL + '\n[[function]]\nname = "version_proc_show"\nedition = "cmdline_proc_show_v2"\n'
    err = load_error(tmp_path, toml)
    assert err.message == (
        "[[function]] #2: edition 'cmdline_proc_show_v2' is already used for vmlinux function "
        "'cmdline_proc_show' (line 5); each function needs its own edition"
    )
    assert err.line == 11


# --- bad update.toml: editions in C -------------------------------------------------------------


def test_edition_not_defined_names_edition_and_toml_line(tmp_path: Path) -> None:
    c = (
        "/* int cmdline_proc_show_v2(void) { } */\n"
        'static const char *s = "int cmdline_proc_show_v2(void) {";\n'
    )
    err = load_error(tmp_path, MINIMAL, {"a.c": c, "b.c": "int unrelated(void) { return 0; }\n"})
    assert err.path == tmp_path / "src" / UPDATE_TOML
    assert err.line == 7
    assert err.message == (
        "[[function]] #1: edition 'cmdline_proc_show_v2' is not defined in any .c file (searched: a.c, b.c)"
    )


def test_edition_only_declared(tmp_path: Path) -> None:
    c = "#include <linux/seq_file.h>\nint cmdline_proc_show_v2(struct seq_file *m, void *v);\n"
    err = load_error(tmp_path, MINIMAL, {"decl.c": c})
    assert "is not defined in any .c file (only declared, at decl.c:2)" in err.message
    assert err.line == 7


def test_edition_defined_static_names_c_file_and_line(tmp_path: Path) -> None:
    c = EDITION_C.replace("int cmdline_proc_show_v2", "static int\ncmdline_proc_show_v2")
    err = load_error(tmp_path, MINIMAL, {"edition.c": c})
    assert err.path == tmp_path / "src" / "edition.c"
    assert err.line == 4
    assert err.message == (
        "edition 'cmdline_proc_show_v2' (for vmlinux function 'cmdline_proc_show', update.toml line 7) "
        "is defined static; remove 'static' so the livepatch code can link to it"
    )


def test_edition_declared_static_before_definition(tmp_path: Path) -> None:
    c = "static int cmdline_proc_show_v2(struct seq_file *m, void *v);\n\n" + EDITION_C
    err = load_error(tmp_path, MINIMAL, {"edition.c": c})
    assert err.path == tmp_path / "src" / "edition.c"
    assert err.line == 1
    assert "is declared static" in err.message


def test_edition_defined_in_two_files(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL, {"one.c": EDITION_C, "two.c": "\n" + EDITION_C})
    assert err.message == (
        "[[function]] #1: edition 'cmdline_proc_show_v2' is defined more than once: one.c:3, two.c:4"
    )
    assert err.line == 7


def test_static_copy_in_another_file_does_not_hide_the_linkable_one(tmp_path: Path) -> None:
    other = EDITION_C.replace("int cmdline_proc_show_v2", "static int cmdline_proc_show_v2")
    src = load_update_source(make_source(tmp_path, MINIMAL, {"one.c": EDITION_C, "two.c": other}))
    assert src.functions[0].edition == "cmdline_proc_show_v2"


# --- the C scanner itself ---------------------------------------------------------------------


def test_symbol_tables_describe_non_exported_symbols(tmp_path):
    src = tmp_path / "u"
    src.mkdir()
    (src / "e.c").write_text("int ed(void) { return 0; }\n")
    (src / "update.toml").write_text(
        '[update]\nname = "u"\ndescription = "d"\n\n[[function]]\nname = "f"\nedition = "ed"\n\n'
        '[[symbol]]\nname = "ext4_helper"\nobject = "ext4"\nsympos = 2\n\n[[symbol]]\nname = "nr_threads"\n')

    source = load_update_source(src)
    assert [(s.name, s.object, s.sympos, s.line) for s in source.symbols] == [
        ("ext4_helper", "ext4", 2, 9), ("nr_threads", "vmlinux", None, 14)]
    assert isinstance(source.symbols[0], SymbolSpec)


@pytest.mark.parametrize("body, message, line", [
    ('[[symbol]]\nname = "x"\nsympos = 0\n', "sympos must be a positive integer", 11),
    ('[[symbol]]\nname = "x"\nobjct = "ext4"\n', "objct", 11),
    ('[[symbol]]\nname = "x"\n\n[[symbol]]\nname = "x"\n', "already described at line 9", 12),
    ('[[symbol]]\nname = "1x"\n', "name '1x'", 10),
])
def test_bad_symbol_tables(tmp_path, body, message, line):
    src = tmp_path / "u"
    src.mkdir()
    (src / "e.c").write_text("int ed(void) { return 0; }\n")
    (src / "update.toml").write_text(
        '[update]\nname = "u"\ndescription = "d"\n\n[[function]]\nname = "f"\nedition = "ed"\n\n' + body)

    with pytest.raises(UpdateSourceError) as info:
        load_update_source(src)
    assert message in info.value.message and info.value.line == line, (info.value.message, info.value.line)


# --- updates made in code (the patch front end) -----------------------------------------------


def compiled(functions: list[dict[str, object]], name: str = "0001-fix-banner",
             description: str = "dynamos update from 0001-fix-banner.patch") -> UpdateSource:
    tables = {"update": {"name": name, "description": description}, "function": functions}
    return compiled_update_source(tables, Path("/work/patch-build"), origin=Path("/p/0001-fix-banner.patch"))


def compiled_error(functions: list[dict[str, object]], **update: str) -> UpdateSourceError:
    with pytest.raises(UpdateSourceError) as info:
        compiled(functions, **update)
    return info.value


def test_compiled_update_takes_kernel_symbols_and_any_module_name() -> None:
    source = compiled([
        {"name": "cmdline_proc_show", "edition": "dynamos_edition__cmdline_proc_show", "object": "vmlinux"},
        {"name": "c_start.constprop.0", "edition": "dynamos_edition__c_start_constprop_0", "object": "md-mod",
         "sympos": 2},
    ])
    assert source.name == "0001-fix-banner" and source.c_files == () and source.consistency == "per-task"
    assert source.functions == (
        FunctionSpec("cmdline_proc_show", "dynamos_edition__cmdline_proc_show"),
        FunctionSpec("c_start.constprop.0", "dynamos_edition__c_start_constprop_0", object="md_mod", sympos=2),
    )
    assert compiled([{"name": "f", "edition": "e"}], name="Fix_1").livepatch_name == "Fix_1"


@pytest.mark.parametrize("edition", ["f_v2(void); int evil", "2fast", ""])
def test_compiled_edition_must_be_a_c_identifier(edition: str) -> None:
    err = compiled_error([{"name": "f", "edition": edition}])
    assert str(err) == f"/p/0001-fix-banner.patch: [[function]] #1: edition {edition!r} is not a C identifier"


def test_compiled_update_without_functions_is_refused() -> None:
    err = compiled_error([])
    assert str(err) == "/p/0001-fix-banner.patch: the update replaces no function (add a [[function]] table)"
    assert err.exit_status == 2


@pytest.mark.parametrize("update, message", [
    ({"description": "a\0livepatch=N"}, "[update] description must not contain NUL characters"),
    ({"name": "my fix"}, "[update] name 'my fix' may only hold A-Z, a-z, 0-9, '_' and '-' (found ' ')"),
    ({"name": "x" * 56}, "[update] name " + repr("x" * 56) + " is 56 characters; a module name holds at most 55"),
])
def test_compiled_update_values_are_refused_with_the_update_toml_words(update: dict[str, str], message: str) -> None:
    assert compiled_error([{"name": "f", "edition": "e"}], **update).message == message


def test_compiled_duplicates_name_the_table_without_a_line() -> None:
    err = compiled_error([{"name": "f", "edition": "e1"}, {"name": "f", "edition": "e2", "sympos": 1}])
    assert err.message == "[[function]] #2: vmlinux function 'f' sympos 1 is already patched by [[function]] #1"
    assert err.line is None
    err = compiled_error([{"name": "f", "edition": "e"}, {"name": "g", "edition": "e"}])
    assert err.message == ("[[function]] #2: edition 'e' is already used for vmlinux function 'f' "
                           "([[function]] #1); each function needs its own edition")

