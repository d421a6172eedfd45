"""Building update sources against the cached Debian kernel's headers (real Kbuild, ~1 s a build)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynamos.builder import kbuild
from dynamos.builder.kbuild import BuildResult, build_update, error_lines, read_modinfo, rewrite_paths
from dynamos.errors import BuildError
from dynamos.target import TargetKernel
from dynamos.update.modsig import read_module_signature, unsigned_part

RELEASE = "6.1.0-56-amd64"

EDITION_C = """\
#include <linux/seq_file.h>

int my_show(struct seq_file *m, void *v)
{
\tseq_printf(m, "%s\\n", "patched by dynamos");
\treturn 0;
}
"""

# Line 5 lacks its semicolon: gcc reports it at 5:<col> ("expected ';' before 'return'").
BROKEN_C = """\
#include <linux/seq_file.h>

int my_show(struct seq_file *m, void *v)
{
\tseq_printf(m, "%s\\n", "patched by dynamos")
\treturn 0;
}
"""


def write_source(directory: Path, c_text: str = EDITION_C, kernel: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    kernel_line = f'kernel = "{kernel}"\n' if kernel else ""
    (directory / "update.toml").write_text(
        "[update]\n"
        'name = "cmdline-banner"\n'
        'description = "Show a banner in /proc/cmdline"\n'
        f"{kernel_line}"
        "\n"
        "[[function]]\n"
        'name = "cmdline_proc_show"\n'
        'edition = "my_show"\n'
    )
    (directory / "edit.c").write_text(c_text)
    return directory


def _isolate_builds(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Builds go under the test's directory, not the user's cache (kernels still come from it)."""
    mp.setattr(kbuild, "cache_root", lambda: root)


@pytest.fixture
def isolated_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _isolate_builds(monkeypatch, tmp_path / "cache")
    return tmp_path / "cache"


class FakePackages:
    """Stands in for dynamos.update.package, recording what the build layer hands it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def write_package(self, path: Path, **kwargs: Any) -> Path:
        self.calls.append({"path": path, **kwargs})
        path.write_bytes(kwargs["module"])
        return path


class Built(types.SimpleNamespace):
    result: BuildResult
    progress: list[str]
    source_dir: Path
    out_dir: Path
    packages: FakePackages


@pytest.fixture(scope="module")
def built(target: TargetKernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """One real build shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("build")
    packages = FakePackages()
    progress: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        _isolate_builds(mp, tmp / "cache")
        mp.setattr(kbuild, "write_package", packages.write_package)
        source_dir = write_source(tmp / "cmdline-banner", kernel=RELEASE)
        out_dir = tmp / "out"
        out_dir.mkdir()
        result = build_update(source_dir, target, output=out_dir, progress=progress.append)
        yield Built(
            result=result, progress=progress, source_dir=source_dir, out_dir=out_dir, packages=packages
        )


def test_build_produces_a_livepatch_module_for_the_target(built: Built, target: TargetKernel) -> None:
    result = built.result
    assert result.module_path.name == "cmdline_banner.ko"
    assert result.module_path.read_bytes() == result.module
    info = read_modinfo(result.module)
    assert info["livepatch"] == "Y"
    assert info["name"] == "cmdline_banner"
    assert info["dynamos"] == "cmdline-banner"
    assert info["vermagic"] == result.vermagic
    assert result.vermagic.startswith(target.release + " ")
    assert 0 < result.seconds < 120


def test_build_dir_is_per_update_and_release_and_keeps_the_log(built: Built, target: TargetKernel) -> None:
    result = built.result
    assert result.build_dir.name == f"cmdline_banner-{target.release}"
    assert result.build_dir.parent.name == "builds"
    assert (result.build_dir / "build.log").read_text() == result.build_log
    assert "LD [M]" in result.build_log
    assert (result.build_dir / "src" / "edit.c").read_text() == EDITION_C


def test_build_reports_progress(built: Built) -> None:
    assert "compiling edit.c" in built.progress
    assert "linking cmdline_banner.ko" in built.progress
    assert built.progress.index("compiling edit.c") < built.progress.index("linking cmdline_banner.ko")


def test_build_writes_the_package_into_an_output_directory(built: Built, target: TargetKernel) -> None:
    expected = built.out_dir / f"cmdline-banner_{target.release}.dynpkg"
    assert built.result.package_path == expected
    [call] = built.packages.calls
    assert call["path"] == expected
    assert call["kernel_release"] == target.release
    assert call["vermagic"] == built.result.vermagic
    # The package holds the module signed (last, after every rewrite): the ELF bytes are the build's.
    assert read_module_signature(call["module"]) is not None
    assert unsigned_part(call["module"]) == built.result.module
    assert call["build_log"] == built.result.build_log
    assert call["source"].name == "cmdline-banner"


def test_compiler_errors_point_at_the_authors_file(
    tmp_path: Path, isolated_builds: Path, target: TargetKernel
) -> None:
    source_dir = write_source(tmp_path / "broken", BROKEN_C)
    with pytest.raises(BuildError) as info:
        build_update(source_dir, target)
    message = str(info.value)
    assert f"{source_dir}/edit.c:5:" in message
    assert "error:" in message
    build_dir = isolated_builds / "builds" / f"cmdline_banner-{target.release}"
    assert f"{build_dir}/src/edit.c" not in message
    assert str(build_dir / "build.log") in message
    assert (build_dir / "build.log").is_file()


def test_kernel_mismatch_is_refused_before_compiling(
    tmp_path: Path, isolated_builds: Path, target: TargetKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_make(*args: object, **kwargs: object) -> str:
        raise AssertionError("make must not run for a mismatched kernel")

    monkeypatch.setattr(kbuild, "_run_make", no_make)
    source_dir = write_source(tmp_path / "other", kernel="6.1.0-99-amd64")
    with pytest.raises(BuildError) as info:
        build_update(source_dir, target)
    message = str(info.value)
    assert "update.toml" in message
    assert "6.1.0-99-amd64" in message and target.release in message
    assert info.value.line == 4
    assert not (isolated_builds / "builds").exists()


def test_missing_headers_are_reported_with_a_hint(tmp_path: Path, isolated_builds: Path) -> None:
    target = TargetKernel(RELEASE, tmp_path / "no-headers", None, None, None)
    with pytest.raises(BuildError, match=f"install linux-headers-{RELEASE}"):
        build_update(write_source(tmp_path / "src"), target)


@pytest.mark.parametrize("tool", ["make", "gcc"])
def test_missing_tool_is_named(
    tool: str, tmp_path: Path, isolated_builds: Path, target: TargetKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = kbuild.shutil.which
    monkeypatch.setattr(kbuild.shutil, "which", lambda name: None if name == tool else real_which(name))
    with pytest.raises(BuildError, match=rf"needs {tool}\b"):
        build_update(write_source(tmp_path / "src"), target)


def test_rewrite_paths_maps_copies_back_to_the_author() -> None:
    log = (
        "/c/builds/x-6.1/src/edit.c:12:5: error: boom\n"
        "In file included from /c/builds/x-6.1/src/inc/a.h:3,\n"
        "/c/builds/x-6.1/x_main.c:1:1: error: glue\n"
    )
    out = rewrite_paths(log, Path("/c/builds/x-6.1"), Path("/home/me/fix"))
    assert out.splitlines() == [
        "/home/me/fix/edit.c:12:5: error: boom",
        "In file included from /home/me/fix/inc/a.h:3,",
        "/c/builds/x-6.1/x_main.c:1:1: error: glue",  # generated glue stays where it is
    ]


def test_error_lines_keep_errors_excerpts_and_context_but_not_warnings() -> None:
    log = """\
  CC [M]  /b/src/edit.c
/b/src/edit.c: In function 'f':
/b/src/edit.c:3:9: warning: unused variable 'x' [-Wunused-variable]
    3 |     int x;
      |         ^
/b/src/edit.c:5:27: error: expected ';' before 'return'
    5 |         seq_printf(m, "x")
      |                           ^
cc1: some warnings being treated as errors
In file included from /b/src/edit.c:1:
/b/src/a.h:2:1: error: unknown type name 'foo'
    2 | foo bar;
      | ^~~
/b/src/edit.c:9:9: error: too many arguments to function 'seq_setwidth'
In file included from /b/src/edit.c:2:
./include/linux/seq_file.h:102:20: note: declared here
  102 | static inline void seq_setwidth(struct seq_file *m, size_t size)
/b/src/edit.c:11:3: warning: unused value
/b/src/edit.c:11:3: note: a note of a warning
make[1]: *** [Makefile.build:255: /b/src/edit.o] Error 1
ERROR: modpost: "my_show" [/b/x.ko] undefined!
"""
    assert error_lines(log) == [
        "/b/src/edit.c:5:27: error: expected ';' before 'return'",
        '    5 |         seq_printf(m, "x")',
        "      |                           ^",
        "In file included from /b/src/edit.c:1:",
        "/b/src/a.h:2:1: error: unknown type name 'foo'",
        "    2 | foo bar;",
        "      | ^~~",
        "/b/src/edit.c:9:9: error: too many arguments to function 'seq_setwidth'",
        "./include/linux/seq_file.h:102:20: note: declared here",  # where the name is declared
        "  102 | static inline void seq_setwidth(struct seq_file *m, size_t size)",
        'ERROR: modpost: "my_show" [/b/x.ko] undefined!',
    ]
