"""Line-number stabilisation of a patched source file with ``#line`` directives."""

from __future__ import annotations

import random
import re
import subprocess

from dynamos.builder.linemap import safe_line_starts, split_lines, stabilise_lines

_LINE_RE = re.compile(r"^#line (\d+)$")


def numbering(text: str) -> list[tuple[str, int]]:
    """(line, number) for every line of ``text`` except directives, as cpp numbers them when every
    ``#line`` acts (no conditional groups)."""
    result = []
    number = 1
    for line in split_lines(text):
        match = _LINE_RE.match(line.rstrip("\n"))
        if match:
            number = int(match.group(1))
            continue
        result.append((line, number))
        number += 1
    return result


def assert_stable(original: str, patched: str) -> str:
    """Every line the patch kept (same text, in order) has its original number in the result."""
    stable = stabilise_lines(original, patched)
    assert [line for line, _ in numbering(stable)] == split_lines(patched)  # only directives were added
    old = split_lines(original)
    numbers = dict.fromkeys(range(1, len(old) + 1))
    for line, number in numbering(stable):
        if 1 <= number <= len(old) and old[number - 1] == line:
            numbers[number] = line
    kept = _common_lines(old, split_lines(patched))
    for index in kept:
        assert numbers[index + 1] == old[index], f"original line {index + 1} lost its number"
    return stable


def _common_lines(old: list[str], new: list[str]) -> list[int]:
    import difflib

    blocks = difflib.SequenceMatcher(None, old, new, autojunk=False).get_matching_blocks()
    return [i + k for i, _, size in blocks for k in range(size)]


def test_identical_text_is_returned_unchanged() -> None:
    text = "int a;\nint b;\n"
    assert stabilise_lines(text, text) == text


def test_insertion_renumbers_the_following_lines() -> None:
    original = "int a;\nint b;\nint c;\n"
    stable = assert_stable(original, "int a;\nint new1;\nint new2;\nint b;\nint c;\n")
    assert stable == "int a;\nint new1;\nint new2;\n#line 2\nint b;\nint c;\n"


def test_deletion_skips_the_removed_numbers() -> None:
    stable = assert_stable("int a;\nint b;\nint c;\nint d;\n", "int a;\nint d;\n")
    assert stable == "int a;\n#line 4\nint d;\n"


def test_same_length_replacement_needs_no_directive() -> None:
    original = "int a;\nint b;\nint c;\n"
    assert stabilise_lines(original, "int a;\nlong b;\nint c;\n") == "int a;\nlong b;\nint c;\n"


def test_no_directive_inside_a_macro_definition() -> None:
    original = "#define TWICE(x) \\\n\t((x) + \\\n\t (x))\nint a;\n"
    patched = "#define TWICE(x) \\\n\t((x) + (x) + \\\n\t0 + \\\n\t (x))\nint a;\n"
    stable = stabilise_lines(original, patched)
    assert stable == patched.replace("int a;", "#line 4\nint a;")  # after the definition, not in it


def test_no_directive_inside_a_comment_or_a_call() -> None:
    original = "/*\n * one\n * two\n */\nint f(void)\n{\n\treturn g(1,\n\t\t 2);\n}\n"
    patched = "/*\n * one\n * added\n * two\n */\nint f(void)\n{\n\treturn g(1,\n\t\t 3,\n\t\t 2);\n}\n"
    stable = stabilise_lines(original, patched)
    assert stable == patched.replace("int f", "#line 5\nint f").replace("2);\n}", "2);\n#line 9\n}")


def test_form_feed_is_not_a_line_break() -> None:
    original = "int a;\n\x0c\nint b;\n"
    assert stabilise_lines(original, "int new;\n" + original) == "int new;\n#line 1\nint a;\n\x0c\nint b;\n"


def test_safe_line_starts_sees_comments_strings_and_continuations() -> None:
    lines = split_lines('a = "x\\\ny";\n/* c\nd */\n#if (X\\\n)\n// e \\\nf\nb = \'(\';\nc();\n')
    assert safe_line_starts(lines) == [True, False, True, False, True, False, True, False, True, True]


def test_random_edits_keep_every_unchanged_line_number() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        original = [f"int v{i};\n" for i in range(rng.randint(0, 30))]
        patched = list(original)
        for _ in range(rng.randint(0, 5)):
            at = rng.randint(0, len(patched))
            if patched and rng.random() < 0.4:
                del patched[min(at, len(patched) - 1)]
            else:
                patched.insert(at, f"int added{rng.randint(0, 99)};\n")
        assert_stable("".join(original), "".join(patched))


def preprocess(text: str, *defines: str) -> str:
    return subprocess.run(["gcc", "-E", "-P", *(f"-D{d}" for d in defines), "-x", "c", "-"], input=text,
                          capture_output=True, text=True, check=True).stdout



ORIGINAL_C = """\
int first(void)
{
\treturn 1;
}

int unchanged(void)
{
\treturn __LINE__;
}
"""


def test_line_of_unchanged_function_survives_an_insertion_above_it() -> None:
    patched = ORIGINAL_C.replace("\treturn 1;\n", "\tint x = 2;\n\n\tx *= 3;\n\treturn x - 5;\n")
    assert "return 8;" in preprocess(ORIGINAL_C)
    assert "return 11;" in preprocess(patched)
    assert "return 8;" in preprocess(stabilise_lines(ORIGINAL_C, patched))


def test_numbering_is_restored_after_a_skipped_conditional_group() -> None:
    # The directive for the line after the insertion lands inside #ifdef DEBUG; without DEBUG
    # that directive does not act, so the numbering is set again after #endif.
    original = "#ifdef DEBUG\nint dbg_a;\nint dbg_b;\n#endif\nint line = __LINE__;\n"
    patched = "#ifdef DEBUG\nint dbg_a;\nint dbg_new;\nint dbg_b;\n#endif\nint line = __LINE__;\n"
    stable = stabilise_lines(original, patched)
    assert "int line = 5;" in preprocess(stable)
    assert "int line = 5;" in preprocess(stable, "DEBUG")
