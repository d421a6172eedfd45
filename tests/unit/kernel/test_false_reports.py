"""False reports the kernel layer must not make: each scenario on the simulated kernel."""

from __future__ import annotations

import pytest

from dynamos.errors import DynamosError
from dynamos.kernel import BlockedTransition, PreflightRefused
from tests.support.harness import KernelHarness


def _blocked_revert(h: KernelHarness) -> None:
    h.kernel.apply(h.add("glob", consistency="global"))
    assert h.sim.global_state["glob"] == "new"
    h.sim.add_task(900, "stuck", ["[<0>] cmdline_proc_show+0x1/0x2"], blocked=True)


def test_timed_out_global_revert_puts_the_editions_back(harness: KernelHarness) -> None:
    h = harness
    _blocked_revert(h)
    with pytest.raises(BlockedTransition) as info:
        h.kernel.revert("glob", timeout=1)
    assert info.value.outcome == "restored" and "switched back to their new editions" in str(info.value)
    assert h.sim.global_state["glob"] == "new"  # the fix runs again, as before the revert
    (update,) = h.kernel.status().updates
    assert update.enabled and update.to_json()["global_switch"] == "new" and update.warning is None


def test_timed_out_global_revert_says_when_edition_0_still_serves(harness: KernelHarness) -> None:
    h = harness
    _blocked_revert(h)
    h.sim.global_refuse.add("new")  # the switch back finds calls in flight
    with pytest.raises(BlockedTransition) as info:
        h.kernel.revert("glob", timeout=1)
    assert info.value.outcome == "restored, serving edition 0"
    assert "fix is NOT running" in str(info.value) and "stays applied" not in str(info.value)
    (update,) = h.kernel.status().updates
    data = update.to_json()
    assert data["enabled"] and data["global_switch"] == "old" and "edition 0" in data["warning"]
    assert h.log()[-1]["result"] == "restored, serving edition 0"


def test_interrupting_the_cleanup_of_a_replace_keeps_the_new_update(harness: KernelHarness,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    h.apply("old-a", "do_sys_open")
    h.apply("old-b", "vfs_read")
    real = h.sim.delete_module

    def ctrl_c(name: str, flags: int = 0) -> None:
        if name == "old_b":
            raise KeyboardInterrupt
        real(name, flags)

    monkeypatch.setattr(h.sim, "delete_module", ctrl_c)
    with pytest.raises(DynamosError) as info:
        h.apply("new", "cmdline_proc_show", replace=True)
    msg = str(info.value)
    assert "new: applied" in msg and "interrupted" in msg and "old_b are still loaded" in msg
    assert "reverted" not in msg
    patch = h.sim.patches["new"]
    assert patch.enabled and not patch.transition and "new" in h.sim.modules
    assert h.record("new").exists() and not h.record("old_a").exists() and h.record("old_b").exists()
    assert h.log()[-1]["result"] == "ok, cleanup interrupted" and h.log()[-1]["details"]["still_loaded"] == ["old_b"]


@pytest.mark.parametrize("names, said", [
    ({"module_name": "other_mod"}, "names itself other_mod"),
    ({"modinfo_name": "other_mod"}, "name=other_mod"),
])
def test_a_module_named_otherwise_is_refused_before_loading(harness: KernelHarness, names: dict[str, str],
                                                            said: str) -> None:
    h = harness
    with pytest.raises(PreflightRefused) as info:
        h.kernel.apply(h.add("fix-x", image_names=names))
    assert said in str(info.value) and [r.code for r in info.value.reasons] == ["module-identity"]
    assert not h.syscalls("init_module") and not h.record("fix_x").exists()
    assert h.log()[-1]["result"] == "refused"


def test_module_identity_reads_the_image(harness: KernelHarness) -> None:
    from dynamos.kernel.modident import identity_problem, module_identity
    from dynamos.update.package import read_package

    pkg = read_package(harness.add("fix-x"))
    ident = module_identity(pkg.module)
    assert (ident.this_module, ident.modinfo) == ("fix_x", "fix_x")
    assert identity_problem(pkg.module, "fix_x") is None
    assert "cannot be read" in (identity_problem(b"\x7fELF", "fix_x") or "")
