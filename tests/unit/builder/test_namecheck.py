"""Build-time name checks: a typo in update.toml fails at build time, with its line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dynamos.builder import namecheck
from dynamos.errors import UpdateSourceError
from dynamos.target import TargetKernel
from dynamos.update.validate import load_update_source
from tests.support.gcc import compile_kernel_like

KALLSYMS = """\
ffffffff81000000 T _text
ffffffff81100000 T cmdline_proc_show
ffffffff81100100 t show_map
ffffffff81100200 d show_map
ffffffff81100300 t show_map
ffffffff81200000 D saved_command_line
"""


def source(tmp_path: Path, function: str, *, obj: str = "vmlinux", sympos: int | None = None,
           symbol: str | None = None) -> Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    extra = f"sympos = {sympos}\n" if sympos else ""
    sym = f'\n[[symbol]]\nname = "{symbol}"\n' if symbol else ""
    (d / "update.toml").write_text(f'[update]\nname = "fix"\ndescription = "d"\n\n[[function]]\nname = "{function}"\n'
                                   f'edition = "new_edition"\nobject = "{obj}"\n{extra}{sym}')
    (d / "e.c").write_text("int new_edition(void) { return 0; }\n")
    return d


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TargetKernel:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(KALLSYMS)
    monkeypatch.setattr(namecheck, "kallsyms_path", lambda _t: kallsyms)
    mods = tmp_path / "lib/modules/6.1.0-56-amd64"
    obj = compile_kernel_like(tmp_path / "m", "ext4", "int ext4_file_write_iter(void) { return 1; }\n")
    (mods / "kernel/fs/ext4").mkdir(parents=True)
    shutil.copy(obj, mods / "kernel/fs/ext4/ext4.ko")
    return TargetKernel("6.1.0-56-amd64", tmp_path, mods, None, None)


def check(src: Path, target: TargetKernel) -> list[str]:
    warnings: list[str] = []
    namecheck.check_names(load_update_source(src), target, warnings.append)
    return warnings


def test_known_names_pass(tmp_path: Path, target: TargetKernel) -> None:
    assert check(source(tmp_path, "show_map", sympos=3, symbol="saved_command_line"), target) == []
    assert check(source(tmp_path, "ext4_file_write_iter", obj="ext4"), target) == []


def test_a_typo_fails_with_its_line_and_a_hint(tmp_path: Path, target: TargetKernel) -> None:
    with pytest.raises(UpdateSourceError) as info:
        check(source(tmp_path, "cmdline_proc_shw"), target)
    assert info.value.line == 5 and info.value.path.name == "update.toml"
    assert "'cmdline_proc_shw' is not in vmlinux of kernel 6.1.0-56-amd64" in str(info.value)
    assert "did you mean 'cmdline_proc_show'" in str(info.value)


def test_data_symbol_is_not_a_function(tmp_path: Path, target: TargetKernel) -> None:
    with pytest.raises(UpdateSourceError, match="function 'saved_command_line' is not in vmlinux"):
        check(source(tmp_path, "saved_command_line"), target)


def test_module_function_typo_and_sympos_range(tmp_path: Path, target: TargetKernel) -> None:
    with pytest.raises(UpdateSourceError, match="'ext4_file_write' is not in ext4"):
        check(source(tmp_path, "ext4_file_write", obj="ext4"), target)
    with pytest.raises(UpdateSourceError, match="sympos 4 of 'show_map' is out of range.*3 symbol"):
        check(source(tmp_path, "show_map", sympos=4), target)
    with pytest.raises(UpdateSourceError, match=r"\[\[symbol\]\]: symbol 'saved_cmdline' is not in vmlinux"):
        check(source(tmp_path, "show_map", sympos=1, symbol="saved_cmdline"), target)


def test_without_tables_it_warns_and_lets_apply_check(tmp_path: Path, target: TargetKernel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namecheck, "kallsyms_path", lambda _t: tmp_path / "none")
    warnings = check(source(tmp_path, "cmdline_proc_shw"), target)
    assert len(warnings) == 1 and "no symbol table of 6.1.0-56-amd64 cached" in warnings[0]
    assert "nfs (" in check(source(tmp_path, "nfs_fn", obj="nfs"), target)[0]
