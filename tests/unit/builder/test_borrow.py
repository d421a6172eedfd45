"""Which held-back header changes a failed patched compile asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamos.builder.borrow import compile_borrowing, needed_headers, quoted_identifiers
from dynamos.errors import BuildError

ERROR = """\
net/x.c: In function 'x_send':
net/x.c:523:25: error: 'struct sock' has no member named 'sk_use_task_frag'
  523 |         sock->sk->sk_use_task_frag = false;
net/x.c:530:9: error: implicit declaration of function 'tcp_dst_advmss' [-Werror=implicit-function-declaration]
net/x.c:531:9: warning: unused variable 'ignored_word' [-Wunused-variable]
"""


def test_the_identifiers_the_errors_quote() -> None:
    assert quoted_identifiers(ERROR) == {"sk_use_task_frag", "tcp_dst_advmss"}


def test_only_the_headers_whose_change_adds_a_quoted_identifier_are_needed(tmp_path: Path) -> None:
    old = {"include/net/sock.h": "struct sock {\n\tint sk_a;\n};\n",
           "include/net/tcp.h": "int tcp_mss(void);\n",
           "include/linux/mm_types.h": "struct mm_struct {\n\tint a;\n};\n",
           "include/linux/unread.h": "\n"}
    for rel, text in old.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    held_back = {"include/net/sock.h": b"struct sock {\n\tint sk_a;\n\tbool sk_use_task_frag;\n};\n",
                 "include/net/tcp.h": b"int tcp_mss(void);\nstatic inline int tcp_dst_advmss(void) { return 1; }\n",
                 "include/linux/mm_types.h": b"struct mm_struct {\n\tint a;\n\tint futex_unique_id;\n};\n",
                 "include/linux/unread.h": b"int sk_use_task_frag;\n"}
    read = ["include/net/sock.h", "include/net/tcp.h", "include/linux/mm_types.h"]
    assert needed_headers(ERROR, held_back, read, tmp_path) == ["include/net/sock.h", "include/net/tcp.h"]
    # an error that quotes nothing a change adds: every held-back header it reads
    assert needed_headers("x.c:1:1: error: expected ';'", held_back, read, tmp_path) == sorted(read)


def _compiler(needs: set[str], tmp_path: Path, calls: list[list[str]]):
    """A stand-in compile that succeeds when every header in ``needs`` is borrowed."""
    def compile_with(borrowed: list[str]) -> str:
        calls.append(list(borrowed))
        if not needs <= set(borrowed):
            raise BuildError("x.c:1:1: error: initialization of 'int (*)(int)' from incompatible pointer type")
        return "+".join(borrowed)
    return compile_with


def _tree(tmp_path: Path) -> tuple[dict[str, bytes], list[str]]:
    held_back = {}
    for rel in ("a.h", "b.h", "c.h"):
        (tmp_path / rel).write_text("int old;\n")
        held_back[rel] = b"int old;\nint new_" + rel[0].encode() + b";\n"
    return held_back, sorted(held_back)


def test_an_error_that_names_no_added_identifier_borrows_only_what_the_compile_needs(tmp_path: Path) -> None:
    """Every header it reads is tried, then each one the compile does without is dropped again."""
    held_back, read = _tree(tmp_path)
    calls: list[list[str]] = []
    said: list[str] = []
    compile_with = _compiler({"b.h"}, tmp_path, calls)
    first = BuildError("x.c:1:1: error: initialization of 'int (*)(int)' from incompatible pointer type")
    made, borrowed = compile_borrowing(compile_with, first, held_back, read, tmp_path, said.append, "x.c")
    assert borrowed == ["b.h"]
    assert made == "b.h"  # the object left is the one compiled with what is kept
    assert calls == [["a.h", "b.h", "c.h"], ["b.h", "c.h"], ["c.h"], ["b.h"]]
    assert "x.c: compiles without the change to a.h, c.h: not borrowed" in said


def test_a_compile_that_needs_every_borrowed_header_keeps_them_and_recompiles_the_full_set(tmp_path: Path) -> None:
    held_back, read = _tree(tmp_path)
    calls: list[list[str]] = []
    compile_with = _compiler({"a.h", "c.h"}, tmp_path, calls)
    first = BuildError("x.c:1:1: error: expected ';'")
    made, borrowed = compile_borrowing(compile_with, first, held_back, read, tmp_path, lambda m: None, "x.c")
    assert borrowed == ["a.h", "c.h"] and made == "a.h+c.h"
    assert calls[-1] == ["a.h", "c.h"]  # the last trial (without c.h) failed: compiled again


def test_borrowing_that_does_not_help_raises_the_first_error(tmp_path: Path) -> None:
    held_back, read = _tree(tmp_path)
    compile_with = _compiler({"z.h"}, tmp_path, [])
    first = BuildError("x.c:1:1: error: expected ';'")
    with pytest.raises(BuildError) as e:
        compile_borrowing(compile_with, first, held_back, read, tmp_path, lambda m: None, "x.c")
    assert e.value is first


def test_an_error_that_quotes_nothing_added_takes_the_headers_its_notes_point_into(tmp_path: Path) -> None:
    held_back, read = _tree(tmp_path)
    error = ("x.c:9:9: error: too many arguments to function 'old'\n"
             "In file included from x.c:2:\n./b.h:1:5: note: declared here\n"
             "In file included from ./c.h:13,\n                 from x.c:1:\n")  # c.h: only on the way
    assert needed_headers(error, held_back, read, tmp_path) == ["b.h"]
    assert needed_headers("x.c:1:1: error: expected ';'", held_back, read, tmp_path) == ["a.h", "b.h", "c.h"]


def test_one_needed_change_among_many_is_found_in_few_compiles(tmp_path: Path) -> None:
    held_back = {f"h{i:02}.h": b"int n;\n" for i in range(32)}
    for rel in held_back:
        (tmp_path / rel).write_text("int o;\n")
    calls: list[list[str]] = []
    compile_with = _compiler({"h21.h"}, tmp_path, calls)
    made, borrowed = compile_borrowing(compile_with, BuildError("x.c:1:1: error: expected ';'"), held_back,
                                       sorted(held_back), tmp_path, lambda m: None, "x.c")
    assert borrowed == ["h21.h"] and made == "h21.h"
    assert len(calls) <= 16, len(calls)  # one compile per header would be 33
