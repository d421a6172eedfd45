"""abi.py against the runtime C it mirrors: the header's limits and the control files' names.

The C is parsed, not compiled: ``#define DYNAMOS_*`` lines of the runtime's interface header, and
the sysfs attributes of its sources (``__ATTR*(name, ...)``; an attribute's name is its file's).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dynamos import abi
from dynamos.builder import cgen, dispatch

RUNTIME = Path(abi.__file__).resolve().parent / "runtime"
HEADER = RUNTIME / cgen.RUNTIME_HEADER

# header macro -> the abi.py value that mirrors it
MIRRORED = {
    "DYNAMOS_RUNTIME_VERSION": abi.RUNTIME_VERSION,
    "DYNAMOS_MAX_EDITIONS": abi.MAX_EDITIONS,
    "DYNAMOS_MAX_RULES": abi.MAX_RULES,
    "DYNAMOS_MAX_PIDS": abi.MAX_PIDS,
    "DYNAMOS_LATENCY_BUCKETS": abi.LATENCY_BUCKETS,
    "DYNAMOS_SHARE_SCALE": abi.SHARE_SCALE,
    "DYNAMOS_ASK_HANDLER": abi.ASK_HANDLER,
    "DYNAMOS_CONTROL_DIR": abi.CONTROL_DIR,
}
# the runtime source that creates each control file -> the files' names as abi.py gives them
CONTROL_FILES = {
    "dynamos_routes.c": {abi.EDITIONS_FILE, abi.ROUTE_FILE, abi.RETIRE_FILE, abi.LATENCY_FILE,
                         abi.THREAD_FILE},
    "dynamos_global.c": {abi.GLOBAL_FILE},
}

_DEFINE_RE = re.compile(r"^#define\s+(DYNAMOS_\w+)[ \t]+(.+?)\s*(?:/\*.*)?$", re.MULTILINE)
_ATTR_RE = re.compile(r"\b__ATTR(?:_\w+)?\(\s*(\w+)\s*[,)]")  # not __ATTRIBUTE_GROUPS()
_COMMENT_RE = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


def c_value(text: str) -> int | str:
    """The value of a simple C constant: ``16``, ``(-1)``, ``"dynamos"``."""
    text = text.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    return int(text, 0)


def header_defines(path: Path = HEADER) -> dict[str, int | str]:
    """Every ``#define DYNAMOS_* value`` of a header (the include guard has no value)."""
    return {name: c_value(value) for name, value in _DEFINE_RE.findall(path.read_text())}


def sysfs_attributes(path: Path) -> set[str]:
    """Names of the sysfs attributes a C file defines, comments left out."""
    return set(_ATTR_RE.findall(_COMMENT_RE.sub("", path.read_text())))


def test_parsers_read_kernel_c() -> None:
    assert c_value("(-1)") == -1 and c_value("0x10") == 16 and c_value('"dynamos"') == "dynamos"
    text = '#define DYNAMOS_X 40\t/* a comment */\n#define DYNAMOS_H_\n#define DYNAMOS_S "a b"\n'
    assert {n: c_value(v) for n, v in _DEFINE_RE.findall(text)} == {"DYNAMOS_X": 40, "DYNAMOS_S": "a b"}
    c = ('static struct kobj_attribute a = __ATTR_RO_MODE(editions, 0400);\n'
         '/* __ATTR(commented, 0400, NULL, NULL) */\n'
         'static struct kobj_attribute b = __ATTR(route, 0600, route_show, route_store);\n'
         'static struct kobj_attribute c = __ATTR_WO(retire);\n__ATTRIBUTE_GROUPS(function);\n')
    assert set(_ATTR_RE.findall(_COMMENT_RE.sub("", c))) == {"editions", "route", "retire"}


@pytest.mark.parametrize("macro", sorted(MIRRORED))
def test_abi_mirrors_the_header(macro: str) -> None:
    defines = header_defines()
    assert macro in defines, f"{HEADER.name} no longer defines {macro}, which abi.py mirrors"
    assert defines[macro] == MIRRORED[macro], (
        f"{HEADER.name} has {macro} {defines[macro]!r} but abi.py has {MIRRORED[macro]!r}")


def test_every_limit_of_the_header_is_mirrored() -> None:
    """A value the interface header defines is ABI: Python must know it (values only the
    runtime's own files need belong in dynamos_internal.h)."""
    unmirrored = sorted(set(header_defines()) - set(MIRRORED))
    assert not unmirrored, f"{HEADER.name} defines {', '.join(unmirrored)}: mirror them in abi.py"


@pytest.mark.parametrize("source", sorted(CONTROL_FILES))
def test_control_files_are_named_as_abi_says(source: str) -> None:
    assert sysfs_attributes(RUNTIME / source) == CONTROL_FILES[source]


def test_no_other_runtime_file_makes_control_files() -> None:
    makers = {p.name for p in RUNTIME.glob("*.[ch]") if sysfs_attributes(p)}
    assert makers == set(CONTROL_FILES)


def test_the_header_documents_every_control_file() -> None:
    text = HEADER.read_text()
    documented = set(re.findall(r"^ \*   (\w+)\s", text, re.MULTILINE))
    assert set().union(*CONTROL_FILES.values()) - {abi.GLOBAL_FILE} <= documented
    assert f"/sys/module/<update>/{abi.CONTROL_DIR}/{abi.GLOBAL_FILE}" in text


def test_the_glue_names_its_parameter_as_abi_says() -> None:
    params = re.findall(r"^module_param\w*\((\w+),", cgen.SIGNAL_BLOCKERS_SOURCE, re.MULTILINE)
    assert params == [abi.SIGNAL_BLOCKERS_PARAM]


def test_the_builder_ships_every_runtime_file() -> None:
    """dispatch.py's lists are the runtime: a file added to runtime/ must be added there."""
    shipped = {*dispatch.RUNTIME_HEADERS, *dispatch.RUNTIME_SOURCES, dispatch.SHADOW_HEADER,
               dispatch.SHADOW_SOURCE}
    assert shipped == {p.name for p in RUNTIME.glob("*.[ch]")}
    unit = dispatch.runtime_files()[dispatch.RUNTIME_OBJECT.replace(".o", ".c")]
    assert re.findall(r'^#include "(.+)"$', unit, re.MULTILINE) == list(dispatch.RUNTIME_SOURCES)
