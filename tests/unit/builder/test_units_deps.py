"""The compiler's dependency output of a unit, as Kbuild leaves it: the raw ``-MMD`` rule and the
``.o.cmd`` file fixdep makes of it. It confirms which units a changed header really reaches."""

from __future__ import annotations

from pathlib import Path

from dynamos.builder.units import parse_dependencies, read_dependencies

TREE = Path("/src/linux")

FIXDEP = """\
savedcmd_fs/proc/cmdline.o := gcc -Wp,-MMD,fs/proc/.cmdline.o.d -nostdinc -I./include -c -o fs/proc/cmdline.o \
fs/proc/cmdline.c

source_fs/proc/cmdline.o := fs/proc/cmdline.c

deps_fs/proc/cmdline.o := \\
  include/linux/compiler-version.h \\
    $(wildcard include/config/CC_VERSION_TEXT) \\
  include/linux/kconfig.h \\
    $(wildcard include/config/CPU_BIG_ENDIAN) \\
    $(wildcard include/config/BOOGER) \\
  /src/linux/include/linux/fs.h \\
  /usr/lib/gcc/x86_64-linux-gnu/12/include/stdarg.h \\
  ./include/linux/./seq_file.h \\

fs/proc/cmdline.o: $(deps_fs/proc/cmdline.o)

$(deps_fs/proc/cmdline.o):

fs/proc/cmdline.o: $(wildcard ./tools/objtool/objtool)
"""

RAW = """\
fs/proc/cmdline.o: fs/proc/cmdline.c include/linux/compiler-version.h \\
 include/linux/kconfig.h /src/linux/include/linux/fs.h \\
 include/linux/with\\ space.h
include/linux/kconfig.h:
include/linux/fs.h:
"""


def test_fixdep_cmd_file_lists_the_files_read_and_not_the_config_options() -> None:
    assert parse_dependencies(FIXDEP, TREE) == (
        "fs/proc/cmdline.c", "include/linux/compiler-version.h", "include/linux/kconfig.h", "include/linux/fs.h",
        "include/linux/seq_file.h")


def test_raw_compiler_rule_lists_the_files_read() -> None:
    assert parse_dependencies(RAW, TREE) == (
        "fs/proc/cmdline.c", "include/linux/compiler-version.h", "include/linux/kconfig.h", "include/linux/fs.h",
        "include/linux/with space.h")


def test_the_cmd_file_is_read_first_then_the_d_file(tmp_path: Path) -> None:
    obj = tmp_path / "fs/proc/cmdline.o"
    obj.parent.mkdir(parents=True)
    assert read_dependencies(obj, tmp_path) is None
    (obj.parent / ".cmdline.o.d").write_text(RAW)
    assert read_dependencies(obj, tmp_path)[-1] == "include/linux/with space.h"
    (obj.parent / ".cmdline.o.cmd").write_text(FIXDEP)
    assert read_dependencies(obj, tmp_path)[-1] == "include/linux/seq_file.h"
