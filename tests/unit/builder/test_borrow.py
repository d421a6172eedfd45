"""Which held-back header changes a failed patched compile asks for."""

from __future__ import annotations

from pathlib import Path

from dynamos.builder.borrow import needed_headers, quoted_identifiers

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
