"""Installed updates on the simulated kernel: install, uninstall, load --all (what boot runs), gc
and routes stored with ``switch --persist``. A reboot is the simulated kernel's: every livepatch
and /run gone, /var kept."""

from __future__ import annotations

import json

import pytest

from dynamos.errors import PackageError, RefusedError
from dynamos.kernel.installed import EXIT_LOAD_FAILED, Installer
from tests.support.harness import KernelHarness

OTHER = "6.1.0-55-amd64"


def installer(h: KernelHarness) -> Installer:
    return Installer(h.kernel)


def outcomes(result) -> dict[str, str]:
    return {item["name"]: item["outcome"] for item in result.items}


def test_install_verifies_stores_in_order_and_applies(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    first = inst.install(h.add("fix-a"))
    second = inst.install(h.add("fix-b", "vfs_read"), apply=False)
    assert outcomes(first) == {"fix-a": "installed and applied"}
    assert second.items[0]["outcome"] == "installed" and "--no-apply" in second.items[0]["message"]
    assert h.sim.patches.keys() == {"fix_a"}
    store = h.sim.root / "var/lib/dynamos" / h.sim.kernel_release
    assert sorted(p.name for p in store.iterdir()) == ["fix_a.dynpkg", "fix_a.json", "fix_b.dynpkg", "fix_b.json"]
    assert [e.name for e in inst.store.entries(h.sim.kernel_release)] == ["fix-a", "fix-b"]
    assert json.loads((store / "fix_b.json").read_text())["order"] == 2
    assert [(e["action"], e["name"]) for e in h.log() if e["action"] == "install"] == [
        ("install", "fix_a"), ("install", "fix_b")]


def test_install_refuses_a_bad_package_and_stores_nothing(harness: KernelHarness, signer) -> None:
    h = harness
    h.use_trust()  # production policy: signed by a trusted signer, and nobody is trusted yet
    with pytest.raises(PackageError, match="not signed|unsigned"):
        installer(h).install(h.add("fix-a"))
    with pytest.raises(PackageError, match="no trusted signers"):
        installer(h).install(h.add("fix-b", signer=signer))
    assert not (h.sim.root / "var/lib/dynamos" / h.sim.kernel_release).exists()
    assert not h.syscalls("init_module")


def test_load_all_after_reboot_loads_in_order_and_skips_other_releases(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"))
    inst.install(h.add("fix-b", "vfs_read"))
    inst.install(h.add("old-kernel-fix", release=OTHER))
    assert h.sim.patches.keys() == {"fix_a", "fix_b"}
    h.sim.reboot()
    before = len(h.syscalls("init_module"))
    result = inst.load_all()
    assert result.exit_status == 0
    assert outcomes(result) == {"old-kernel-fix": "skipped", "fix-a": "loaded", "fix-b": "loaded"}
    skipped = next(i for i in result.items if i["outcome"] == "skipped")
    assert skipped["release"] == OTHER and h.sim.kernel_release in skipped["message"]
    assert len(h.syscalls("init_module")) - before == 2 and set(h.sim.patches) == {"fix_a", "fix_b"}
    assert [e["result"] for e in h.log() if e["action"] == "load"] == ["skipped"]
    again = inst.load_all()  # a second run changes nothing
    assert outcomes(again)["fix-a"] == "already live" and again.exit_status == 0


def test_one_failing_update_does_not_stop_the_rest(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    for name, fn in (("fix-a", "cmdline_proc_show"), ("fix-b", "vfs_read"), ("fix-c", "do_sys_open")):
        inst.install(h.add(name, fn), apply=False)
    h.sim.reboot()
    h.sim.refuse_modules = {"fix_b"}
    result = inst.load_all()
    assert outcomes(result) == {"fix-a": "loaded", "fix-b": "failed", "fix-c": "loaded"}
    assert result.exit_status == EXIT_LOAD_FAILED
    failed = result.items[1]
    assert failed["exit_status"] == 5 and "refused module fix_b" in failed["message"]
    assert set(h.sim.patches) == {"fix_a", "fix_c"}
    assert "fix-b" in result.notes[0]
    data = result.to_json()
    assert data["ok"] is False and data["exit_status"] == EXIT_LOAD_FAILED


def test_load_all_verifies_every_signature(harness: KernelHarness, signer, other_signer) -> None:
    h = harness
    h.use_trust()
    keyring = h.trust(signer)
    h.trust(other_signer)
    inst = installer(h)
    inst.install(h.add("fix-a", signer=signer))
    inst.install(h.add("fix-b", "vfs_read", signer=signer))
    h.sim.reboot()
    keyring.unlink()  # the signer is revoked before the next boot
    result = installer(h).load_all()
    assert outcomes(result) == {"fix-a": "failed", "fix-b": "failed"}
    assert {r["code"] for i in result.items for r in i["refusals"]} == {"unknown-signer"}
    assert not h.sim.patches and result.exit_status == EXIT_LOAD_FAILED


def test_replace_chain_loads_from_the_last_replacing_update(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"), apply=False)
    inst.install(h.add("fix-b", "vfs_read"), apply=False)
    noted = inst.install(h.add("cumulative", "cmdline_proc_show", "vfs_read", replace=True), apply=False)
    assert "fix-a, fix-b will not load" in noted.notes[0]
    inst.install(h.add("fix-d", "do_sys_open"), apply=False)
    result = inst.load_all()
    assert outcomes(result) == {"fix-a": "replaced", "fix-b": "replaced", "cumulative": "loaded", "fix-d": "loaded"}
    assert set(h.sim.patches) == {"cumulative", "fix_d"} and len(h.syscalls("init_module")) == 2


def test_a_failing_replacing_update_falls_back_to_the_chain_before_it(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"), apply=False)
    inst.install(h.add("fix-b", "vfs_read"), apply=False)
    inst.install(h.add("cumulative", "cmdline_proc_show", "vfs_read", replace=True), apply=False)
    inst.install(h.add("fix-d", "do_sys_open"), apply=False)
    h.sim.refuse_modules = {"cumulative"}
    result = inst.load_all()
    assert outcomes(result) == {"fix-a": "loaded", "fix-b": "loaded", "cumulative": "failed", "fix-d": "loaded"}
    assert set(h.sim.patches) == {"fix_a", "fix_b", "fix_d"}
    assert result.exit_status == EXIT_LOAD_FAILED


def test_uninstalling_the_base_of_a_replace_chain_says_what_loads_again(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"))
    inst.install(h.add("fix-b", "vfs_read"))
    inst.install(h.add("cumulative", "cmdline_proc_show", "vfs_read", replace=True))
    inst.install(h.add("fix-d", "do_sys_open"))
    assert set(h.sim.patches) == {"cumulative", "fix_d"}
    result = inst.uninstall("cumulative")
    assert outcomes(result) == {"cumulative": "reverted and uninstalled"}
    text = " ".join(result.notes)
    assert "base of a replace chain" in text and "load again: fix-a, fix-b" in text
    assert "not applied now" in text and "stay installed: fix-d" in text
    assert set(h.sim.patches) == {"fix_d"}
    h.sim.reboot()
    assert outcomes(inst.load_all()) == {"fix-a": "loaded", "fix-b": "loaded", "fix-d": "loaded"}


def test_uninstall_reverts_when_live_and_refuses_an_unknown_name(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"))
    inst.install(h.add("fix-x", release=OTHER))
    with pytest.raises(RefusedError, match="no update named fix_q is installed .*installed: fix-a"):
        inst.uninstall("fix-q")
    result = inst.uninstall("fix-a")
    assert outcomes(result) == {"fix-a": "reverted and uninstalled"}
    assert not h.sim.patches and not (h.sim.root / "var/lib/dynamos" / h.sim.kernel_release).exists()
    other = inst.uninstall("fix-x", release=OTHER)
    assert outcomes(other) == {"fix-x": "uninstalled"} and inst.store.releases() == []


def test_persisted_route_is_restored_at_boot(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    editions = {"cmdline_proc_show": ["cmdline_proc_show", "banner", "plain"]}
    inst.install(h.add("fix-e", editions=editions))
    route = h.sim.root / "sys/module/fix_e/dynamos/cmdline_proc_show/route"
    for line in ("default 2", "pids 1 812", "share 1 2500"):
        h.sim.write_attribute(str(route), line.encode())
    kept, dropped = inst.persist_route("fix-e", "cmdline_proc_show", route.read_text().splitlines())
    assert kept == ["default 2", "share 1 2500"] and dropped == ["pids 1 812"]
    h.sim.reboot()
    result = inst.load_all()
    assert result.exit_status == 0 and result.items[0]["routes"] == {"cmdline_proc_show": kept}
    assert route.read_text().splitlines() == ["default 2", "share 1 2500"]
    assert [c[3] for c in h.sim.calls if c[0] == "route"][-3:] == ["reset", "default 2", "share 1 2500"]
    inst.persist_route("fix-e", "cmdline_proc_show", None)  # switch --reset --persist
    h.sim.reboot()
    inst.load_all()
    assert route.read_text().splitlines() == ["default 1"]  # the route the update loads with


def test_a_route_that_cannot_be_restored_is_reported(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-e", editions={"cmdline_proc_show": ["cmdline_proc_show", "banner"]}))
    entry = inst.store.find("fix-e", h.sim.kernel_release)
    entry.routes = {"cmdline_proc_show": ["default 7"]}  # an edition the module does not have
    inst.store.save(entry)
    h.sim.reboot()
    result = inst.load_all()
    assert outcomes(result) == {"fix-e": "loaded"} and "not restored" in result.items[0]["route_errors"][0]
    assert result.exit_status == EXIT_LOAD_FAILED


def test_persist_needs_an_installed_update(harness: KernelHarness) -> None:
    h = harness
    h.apply("fix-e")
    with pytest.raises(RefusedError, match="not installed for kernel .*dynamos install PKG"):
        installer(h).installed_for_running("fix-e")


def test_gc_removes_releases_whose_modules_are_gone(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    (h.sim.root / "lib/modules/6.1.0-54-amd64").mkdir(parents=True)
    inst.install(h.add("fix-a"))
    inst.install(h.add("fix-b", release="6.1.0-54-amd64"))
    inst.install(h.add("fix-c", release=OTHER))
    (h.sim.root / "var/lib/dynamos/accepted").mkdir(parents=True, exist_ok=True)
    result = inst.gc()
    assert [(i["name"], i["release"]) for i in result.items] == [("fix-c", OTHER)]
    assert inst.store.releases() == ["6.1.0-54-amd64", h.sim.kernel_release]
    assert (h.sim.root / "var/lib/dynamos/accepted").is_dir()
    assert inst.gc().items == []


def test_reinstalling_keeps_stored_routes_and_moves_to_the_end(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    editions = {"cmdline_proc_show": ["cmdline_proc_show", "banner"]}
    inst.install(h.add("fix-e", editions=editions))
    inst.install(h.add("fix-b", "vfs_read"))
    inst.persist_route("fix-e", "cmdline_proc_show", ["default 0"])
    again = inst.install(h.add("fix-e", editions=editions))
    assert "replaced the installed package" in again.notes[0] and again.items[0]["message"] == "already live"
    entries = inst.store.entries(h.sim.kernel_release)
    assert [e.name for e in entries] == ["fix-b", "fix-e"] and entries[1].routes == {"cmdline_proc_show": ["default 0"]}


def test_non_root_is_refused(harness: KernelHarness) -> None:
    h = harness
    path = h.add("fix-a")
    h.sim.configure(euid=1000)
    for call in (lambda i: i.install(path), lambda i: i.load_all(), lambda i: i.uninstall("fix-a"),
                 lambda i: i.gc()):
        with pytest.raises(RefusedError, match="root"):
            call(installer(h))


def test_an_install_whose_apply_fails_is_undone(harness: KernelHarness) -> None:
    h = harness
    inst = installer(h)
    inst.install(h.add("fix-a"), apply=False)
    first = inst.store.find("fix-a", h.sim.kernel_release)
    h.sim.refuse_modules = {"fix_a", "fix_n"}
    with pytest.raises(RefusedError, match="refused module fix_n"):
        inst.install(h.add("fix-n", "vfs_read"))
    with pytest.raises(RefusedError, match="refused module fix_a"):
        inst.install(h.add("fix-a"))
    entries = inst.store.entries(h.sim.kernel_release)
    assert [(e.name, e.created, e.seq) for e in entries] == [("fix-a", first.created, first.seq)]
    assert [e["result"] for e in h.log() if e["action"] == "install"] == ["ok", "ok", "undone", "ok", "undone"]


def test_cli_commands_print_one_json_object_each(harness: KernelHarness, monkeypatch, capsys) -> None:
    """install, load --all, installed, uninstall and gc through the CLI, on the simulated kernel."""
    import dynamos.kernel
    from dynamos.cli import main

    h = harness
    monkeypatch.setattr(dynamos.kernel, "LiveKernel", lambda *a, **kw: h.kernel)

    def run(*argv: str) -> tuple[int, dict]:
        status = main(list(argv))
        return status, json.loads(capsys.readouterr().out)

    status, data = run("install", str(h.add("fix-a")), "--json")
    assert status == 0 and data["ok"] and data["items"][0]["outcome"] == "installed and applied"
    run("install", str(h.add("fix-b", "vfs_read")), "--no-apply", "--json")
    run("install", str(h.add("fix-c", release=OTHER)), "--json")
    h.sim.reboot()
    h.sim.refuse_modules = {"fix_b"}
    status, data = run("load", "--all", "--json")
    assert status == EXIT_LOAD_FAILED and data["exit_status"] == EXIT_LOAD_FAILED and not data["ok"]
    assert {i["name"]: i["outcome"] for i in data["items"]} == {"fix-c": "skipped", "fix-a": "loaded",
                                                                "fix-b": "failed"}
    status, data = run("installed", "--json")
    assert [(i["name"], i["live"]) for i in data["installed"]] == [("fix-c", False), ("fix-a", True),
                                                                   ("fix-b", False)]
    status, data = run("uninstall", "fix-a", "--json")
    assert status == 0 and data["items"][0]["outcome"] == "reverted and uninstalled"
    status, data = run("gc", "--json")
    assert status == 0 and [i["release"] for i in data["items"]] == [OTHER]
    status, data = run("uninstall", "fix-q", "--json")
    assert status == 5 and data["ok"] is False and "no update named fix_q" in data["error"]
    assert main(["load"]) == 64
