"""The C scanner: which functions an update source's C files declare and define, and where."""

from __future__ import annotations

from pathlib import Path

from dynamos.update.cscan import find_c_functions


def test_find_c_functions_classifies_declarations() -> None:
    c = r"""#include <linux/kernel.h>
#define FAKE(x) { x; \
    int in_macro(void) { }
/* int in_comment(void) { } */
// int in_line_comment(void) {
static const char *s = "int in_string(void) {";
static char brace = '{';
static int helper(int a);
int helper(int a) { return a; }

int __attribute__((noinline)) attributed(struct seq_file *m,
                     void *v)
    __cold
{
    if (m) { list_for_each_entry(pos, head, member) { } }
    return helper(1);
}
static inline void tiny(void) {}
extern int proto(void);
int first(void), second(void);
struct ops o = { .f = not_me(1) };
int v = nor_me(2);
module_init(tiny);
"""
    found = [(d.name, d.line, d.is_definition, d.is_static) for d in find_c_functions(Path("x.c"), c)]
    assert found == [
        ("helper", 8, False, True),
        ("helper", 9, True, False),
        ("attributed", 11, True, False),
        ("tiny", 18, True, True),
        ("proto", 19, False, False),
        ("first", 20, False, False),
        ("second", 20, False, False),
    ]
