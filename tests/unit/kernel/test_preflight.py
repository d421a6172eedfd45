"""preflight: every refusal with its message, and the notes it returns."""

from __future__ import annotations

import json
import shutil

import pytest

from dynamos.errors import RefusedError
from dynamos.kernel import LiveKernel, PreflightRefused
from dynamos.update.package import UpdatePackage
from tests.support.harness import KernelHarness, fn


def refusal(kernel: LiveKernel, package: UpdatePackage) -> PreflightRefused:
    with pytest.raises(PreflightRefused) as info:
        kernel.preflight(package)
    assert isinstance(info.value, RefusedError) and info.value.exit_status == 5
    assert "refused, nothing was changed" in str(info.value)
    return info.value


def test_clean_package_passes_without_notes(harness: KernelHarness) -> None:
    h = harness
    assert h.kernel.preflight(h.package()) == []
    assert not any(c[0] in ("init_module", "mount") for c in h.sim.calls)


def test_not_root(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(euid=1000)
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["not-root"]
    assert "must run as root" in str(err) and "effective uid is 1000" in str(err)


def test_no_livepatch_support(harness: KernelHarness) -> None:
    h = harness
    shutil.rmtree(h.sim.root / "sys/kernel/livepatch")
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["no-livepatch"]
    assert "no livepatch support" in str(err) and "sys/kernel/livepatch is missing" in str(err)


def test_other_release(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package(release="6.1.0-55-amd64"))
    assert [r.code for r in err.reasons] == ["release"]
    assert "for kernel 6.1.0-55-amd64, but the running kernel is 6.1.0-56-amd64" in str(err)


def test_vermagic_mismatch(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package(vermagic="6.1.0-55-amd64 SMP mod_unload "))
    assert [r.code for r in err.reasons] == ["vermagic"]


def test_same_livepatch_already_loaded(harness: KernelHarness) -> None:
    h = harness
    h.load_foreign("fix_x", [{"name": "cmdline_proc_show"}])
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["already-loaded"]
    assert "a livepatch named fix_x is already loaded" in str(err)


def test_module_of_the_same_name_loaded(harness: KernelHarness) -> None:
    h = harness
    h.sim.add_module("fix_x")
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["module-loaded"]
    assert "a module named fix_x is already loaded" in str(err)


def test_another_transition_in_progress(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(transition_polls=None)
    h.load_foreign("other", [{"name": "vfs_read"}], polls=0)
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["busy"]
    assert "livepatch other is in transition" in str(err)


def test_unknown_function_and_renamed_hint(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package("fix-x", "no_such_fn", "helper"))
    assert [r.code for r in err.reasons] == ["unknown-function", "unknown-function"]
    assert "function no_such_fn not found in vmlinux" in str(err)
    assert "compiler renamed it: helper.isra.0" in str(err)
    err = refusal(h.kernel, h.package("fix-x", fn("cmdline_proc_show", object="nf_tables")))
    assert "function cmdline_proc_show not found in nf_tables" in str(err)


def test_ambiguous_without_sympos(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package("fix-x", "show_map"))
    assert [r.code for r in err.reasons] == ["ambiguous"]
    msg = str(err)
    assert "function show_map is ambiguous in vmlinux: 3 symbols have that name" in msg
    assert "(functions at 1, 3)" in msg and "set sympos (1..3)" in msg


def test_sympos_out_of_range_or_on_data(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package("fix-x", fn("show_map", sympos=4)))
    assert [r.code for r in err.reasons] == ["sympos-range"]
    assert "sympos 4 of show_map is out of range: vmlinux has 3 symbol(s) named show_map" in str(err)
    err = refusal(h.kernel, h.package("fix-x", fn("show_map", sympos=2)))
    assert [r.code for r in err.reasons] == ["sympos-not-function"]
    assert "data symbol (type d)" in str(err)
    assert h.kernel.preflight(h.package("fix-x", fn("show_map", sympos=3))) == []


def test_not_traceable(harness: KernelHarness) -> None:
    h = harness
    err = refusal(h.kernel, h.package("fix-x", "notrace_fn"))
    assert [r.code for r in err.reasons] == ["not-traceable"]
    assert "function notrace_fn in vmlinux is not traceable" in str(err)


def test_ipmodify_conflict_with_a_non_livepatch_user(harness: KernelHarness) -> None:
    h = harness
    (h.sim.root / "sys/kernel/tracing/enabled_functions").write_text(
        "do_sys_open (1) R I   \ttramp: 0x0 (kretprobe_trampoline+0x0/0x50)\n"
    )
    err = refusal(h.kernel, h.package("fix-x", "do_sys_open"))
    assert [r.code for r in err.reasons] == ["ipmodify"]
    assert "EBUSY" in str(err)


def test_function_patched_by_another_livepatch_is_a_note(harness: KernelHarness) -> None:
    h = harness
    h.load_foreign("older", [{"name": "cmdline_proc_show"}])
    notes = h.kernel.preflight(h.package())
    assert notes == ["cmdline_proc_show (vmlinux) is already patched by older; "
                     "this update takes over while it is loaded"]


def test_module_not_loaded_is_a_note(harness: KernelHarness) -> None:
    h = harness
    notes = h.kernel.preflight(h.package("fix-x", "cmdline_proc_show", fn("xfs_thing", object="xfs")))
    assert notes == ["module xfs is not loaded: xfs_thing will be patched when it loads"]
    assert h.kernel.preflight(h.package("fix-x", fn("nf_hook", object="nf_tables"))) == []


def test_tracefs_is_mounted_when_missing_and_logged(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(tracefs_mounted=False)
    notes = h.kernel.preflight(h.package())
    assert notes == [f"mounted tracefs at {h.sim.root / 'sys/kernel/tracing'}"]
    assert ("mount", "tracefs", str(h.sim.root / "sys/kernel/tracing")) in h.sim.calls
    entry = json.loads(h.log_path.read_text().splitlines()[-1])
    assert (entry["action"], entry["result"]) == ("mount-tracefs", "ok")


def test_tracefs_mount_failure_refuses(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(tracefs_mounted=False, mount_error=19)
    err = refusal(h.kernel, h.package())
    assert [r.code for r in err.reasons] == ["no-ftrace"]
    assert "cannot tell which functions ftrace can redirect" in str(err) and "No such device" in str(err)


def test_every_reason_is_reported_at_once(harness: KernelHarness) -> None:
    h = harness
    h.sim.configure(lockdown="integrity")
    err = refusal(h.kernel, h.package("fix-x", "no_such_fn", "show_map", release="5.10.0-1"))
    assert [r.code for r in err.reasons] == ["module-unsigned", "release", "unknown-function", "ambiguous"]
    assert str(err).count("\n  - ") == 4
