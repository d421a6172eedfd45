"""preflight: every refusal with its message, and the notes it returns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dynamos.errors import RefusedError
from dynamos.kernel import LiveKernel, PreflightRefused
from tests.support.simulated import SimulatedKernel, SimulatedPackage


def setup(tmp_path: Path, **sim_args: Any) -> tuple[SimulatedKernel, LiveKernel]:
    sim = SimulatedKernel(tmp_path / "root", **sim_args)
    for name in ("cmdline_proc_show", "do_sys_open", "vfs_read"):
        sim.add_symbol(name)
    sim.add_symbol("show_map")
    sim.add_symbol("show_map", kind="d")
    sim.add_symbol("show_map")
    sim.add_symbol("notrace_fn", traceable=False)
    sim.add_symbol("helper.isra.0")
    sim.add_symbol("nf_hook", object="nf_tables")
    sim.add_module("nf_tables")
    kernel = LiveKernel(sim.root, sim, poll_interval=0.01, log_path=tmp_path / "actions.log")
    return sim, kernel


def pkg(*functions: dict[str, Any], **kw: Any) -> SimulatedPackage:
    funcs = list(functions) or [{"name": "cmdline_proc_show", "edition": "e1", "object": "vmlinux",
                                 "sympos": None}]
    return SimulatedPackage("fix-x", funcs, **kw)


def refusal(kernel: LiveKernel, package: SimulatedPackage) -> PreflightRefused:
    with pytest.raises(PreflightRefused) as info:
        kernel.preflight(package)
    assert isinstance(info.value, RefusedError) and info.value.exit_status == 5
    assert "refused, nothing was changed" in str(info.value)
    return info.value


def test_clean_package_passes_without_notes(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    assert kernel.preflight(pkg()) == []
    assert not any(c[0] in ("init_module", "mount") for c in sim.calls)


def test_not_root(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path, euid=1000)
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["not-root"]
    assert "must run as root" in str(err) and "effective uid is 1000" in str(err)


def test_no_livepatch_support(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    shutil.rmtree(sim.root / "sys/kernel/livepatch")
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["no-livepatch"]
    assert "no livepatch support" in str(err) and "sys/kernel/livepatch is missing" in str(err)


@pytest.mark.parametrize("mode", ["integrity", "confidentiality"])
def test_lockdown(tmp_path: Path, mode: str) -> None:
    _, kernel = setup(tmp_path, lockdown=mode)
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["lockdown"]
    assert f"kernel lockdown is active ({mode})" in str(err) and "unsigned" in str(err)


def test_signature_enforcement(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path, sig_enforce=True)
    assert "module.sig_enforce=1" in str(refusal(kernel, pkg()))


def test_other_release(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg(kernel_release="6.1.0-55-amd64"))
    assert [r.code for r in err.reasons] == ["release"]
    assert "for kernel 6.1.0-55-amd64, but the running kernel is 6.1.0-56-amd64" in str(err)


def test_vermagic_mismatch(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg(vermagic="6.1.0-55-amd64 SMP mod_unload "))
    assert [r.code for r in err.reasons] == ["vermagic"]


def test_same_livepatch_already_loaded(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    sim.init_module(pkg().module)
    for _ in range(3):
        sim.sleep(0.01)
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["already-loaded"]
    assert "a livepatch named fix_x is already loaded" in str(err)


def test_module_of_the_same_name_loaded(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    sim.add_module("fix_x")
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["module-loaded"]
    assert "a module named fix_x is already loaded" in str(err)


def test_another_transition_in_progress(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path, transition_polls=None)
    sim.init_module(SimulatedPackage("other", [{"name": "vfs_read"}]).module)
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["busy"]
    assert "livepatch other is in transition" in str(err)


def test_unknown_function_and_renamed_hint(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg({"name": "no_such_fn"}, {"name": "helper"}))
    assert [r.code for r in err.reasons] == ["unknown-function", "unknown-function"]
    assert "function no_such_fn not found in vmlinux" in str(err)
    assert "compiler renamed it: helper.isra.0" in str(err)
    err = refusal(kernel, pkg({"name": "cmdline_proc_show", "object": "nf_tables"}))
    assert "function cmdline_proc_show not found in nf_tables" in str(err)


def test_ambiguous_without_sympos(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg({"name": "show_map", "sympos": None}))
    assert [r.code for r in err.reasons] == ["ambiguous"]
    msg = str(err)
    assert "function show_map is ambiguous in vmlinux: 3 symbols have that name" in msg
    assert "(functions at 1, 3)" in msg and "set sympos (1..3)" in msg


def test_sympos_out_of_range_or_on_data(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg({"name": "show_map", "sympos": 4}))
    assert [r.code for r in err.reasons] == ["sympos-range"]
    assert "sympos 4 of show_map is out of range: vmlinux has 3 symbol(s) named show_map" in str(err)
    err = refusal(kernel, pkg({"name": "show_map", "sympos": 2}))
    assert [r.code for r in err.reasons] == ["sympos-not-function"]
    assert "data symbol (type d)" in str(err)
    assert kernel.preflight(pkg({"name": "show_map", "sympos": 3})) == []


def test_not_traceable(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    err = refusal(kernel, pkg({"name": "notrace_fn"}))
    assert [r.code for r in err.reasons] == ["not-traceable"]
    assert "function notrace_fn in vmlinux is not traceable" in str(err)


def test_ipmodify_conflict_with_a_non_livepatch_user(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    (sim.root / "sys/kernel/tracing/enabled_functions").write_text(
        "do_sys_open (1) R I   \ttramp: 0x0 (kretprobe_trampoline+0x0/0x50)\n"
    )
    err = refusal(kernel, pkg({"name": "do_sys_open"}))
    assert [r.code for r in err.reasons] == ["ipmodify"]
    assert "EBUSY" in str(err)


def test_function_patched_by_another_livepatch_is_a_note(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path)
    sim.init_module(SimulatedPackage("older", [{"name": "cmdline_proc_show"}]).module)
    for _ in range(3):
        sim.sleep(0.01)
    notes = kernel.preflight(pkg())
    assert notes == ["cmdline_proc_show (vmlinux) is already patched by older; "
                     "this update takes over while it is loaded"]


def test_module_not_loaded_is_a_note(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path)
    notes = kernel.preflight(pkg({"name": "cmdline_proc_show"}, {"name": "xfs_thing", "object": "xfs"}))
    assert notes == ["module xfs is not loaded: xfs_thing will be patched when it loads"]
    assert kernel.preflight(pkg({"name": "nf_hook", "object": "nf_tables"})) == []


def test_tracefs_is_mounted_when_missing_and_logged(tmp_path: Path) -> None:
    sim, kernel = setup(tmp_path, tracefs_mounted=False)
    notes = kernel.preflight(pkg())
    assert notes == [f"mounted tracefs at {sim.root / 'sys/kernel/tracing'}"]
    assert ("mount", "tracefs", str(sim.root / "sys/kernel/tracing")) in sim.calls
    entry = json.loads((tmp_path / "actions.log").read_text().splitlines()[-1])
    assert (entry["action"], entry["result"]) == ("mount-tracefs", "ok")


def test_tracefs_mount_failure_refuses(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path, tracefs_mounted=False, mount_error=19)
    err = refusal(kernel, pkg())
    assert [r.code for r in err.reasons] == ["no-ftrace"]
    assert "cannot tell which functions ftrace can redirect" in str(err) and "No such device" in str(err)


def test_every_reason_is_reported_at_once(tmp_path: Path) -> None:
    _, kernel = setup(tmp_path, lockdown="integrity")
    err = refusal(kernel, pkg({"name": "no_such_fn"}, {"name": "show_map"}, kernel_release="5.10.0-1"))
    assert [r.code for r in err.reasons] == ["lockdown", "release", "unknown-function", "ambiguous"]
    assert str(err).count("\n  - ") == 4
