"""The live update path on the real Debian kernel: build on the host, apply/status/revert in the
lab through the same CLI a production host runs, behaviour checked through /proc files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from dynamos.builder.kbuild import build_update
from dynamos.errors import PackageError, RefusedError, TransitionError, UpdateSourceError
from dynamos.lab import Lab
from dynamos.lab.vm import labs_dir
from dynamos.target import fetch_target

from .conftest import EXAMPLES, LAB_MODULES, LAB_UPDATES, Guest, lab_config

pytestmark = pytest.mark.lab

BANNER = re.compile(r"^\[live-updated by dynamos\] console=ttyS0 ")
VERSION_TAG = "[live-updated by dynamos]"


def version_source(tag: str, *, replace: bool, name: str) -> dict[str, str]:
    """A variant of examples/version-tag with another tag (for stacking and replace tests)."""
    toml = (EXAMPLES / "version-tag" / "update.toml").read_text()
    toml = toml.replace('name = "version-tag"', f'name = "{name}"')
    if replace:
        toml = toml.replace("[[function]]", "replace = true\n\n[[function]]", 1)
    c = (EXAMPLES / "version-tag" / "version.c").read_text().replace(VERSION_TAG, tag)
    return {"update.toml": toml, "version.c": c}


def test_apply_status_revert_cycle(guest, build):
    pkg = build(EXAMPLES / "cmdline-banner")
    original = guest.read("/proc/cmdline")
    assert "console=ttyS0" in original

    applied = json.loads(guest.dynamos("apply", str(pkg), "--json").stdout)
    assert applied["livepatch_name"] == "cmdline_banner"
    assert set(applied["phases"]) >= {"verify", "preflight", "load", "transition"}

    live = guest.read("/proc/cmdline").strip()
    assert BANNER.match(live), live
    assert live.endswith(original.strip())  # saved_command_line, reached by a livepatch relocation
    status = guest.status()
    assert status["kernel"] == "6.1.0-56-amd64"
    (update,) = status["updates"]
    assert update["name"] == "cmdline_banner" and update["enabled"] and not update["transition"]
    assert update["dynamos"] is True
    assert [(f["name"], f["object"]) for f in update["functions"]] == [("cmdline_proc_show", "vmlinux")]
    assert "cmdline_banner" in guest.modules()

    guest.dynamos("revert", "cmdline-banner")
    assert guest.read("/proc/cmdline") == original
    assert guest.livepatches() == []
    assert "cmdline_banner" not in guest.modules()
    log = [json.loads(line) for line in guest.read("/var/log/dynamos/actions.log").splitlines()]
    # the journal: an intent before each change, its result (same op id) after
    assert [(e["action"], e["result"]) for e in log[-4:]] == [
        ("apply", "intent"), ("apply", "ok"), ("revert", "intent"), ("revert", "ok")]
    assert log[-4]["op"] == log[-3]["op"] and log[-2]["op"] == log[-1]["op"]


def test_stacked_updates(guest, build):
    cmdline = build(EXAMPLES / "cmdline-banner")
    version = build(EXAMPLES / "version-tag")
    original_version = guest.read("/proc/version")
    guest.dynamos("apply", str(cmdline))
    guest.dynamos("apply", str(version))
    try:
        assert BANNER.match(guest.read("/proc/cmdline").strip())
        assert guest.read("/proc/version").strip().endswith(VERSION_TAG)
        names = sorted(u["name"] for u in guest.status()["updates"])
        assert names == ["cmdline_banner", "version_tag"]
    finally:
        guest.dynamos("revert", "version-tag")
        guest.dynamos("revert", "cmdline-banner")
    assert guest.read("/proc/version") == original_version


def test_atomic_replace(guest, build):
    cmdline = build(EXAMPLES / "cmdline-banner")
    version = build(EXAMPLES / "version-tag")
    cumulative = build(version_source("[cumulative v2]", replace=True, name="version-tag-v2"), "version-tag-v2")
    original_cmdline = guest.read("/proc/cmdline")
    guest.dynamos("apply", str(cmdline))
    guest.dynamos("apply", str(version))
    result = json.loads(guest.dynamos("apply", str(cumulative), "--json").stdout)
    try:
        assert sorted(result["replaced"]) == ["cmdline_banner", "version_tag"]
        # The cumulative update alone is live: its tag, and /proc/cmdline back to the original.
        assert guest.read("/proc/version").strip().endswith("[cumulative v2]")
        assert guest.read("/proc/cmdline") == original_cmdline
        assert guest.livepatches() == ["version_tag_v2"]
        modules = guest.modules()
        assert "cmdline_banner" not in modules and "version_tag" not in modules
    finally:
        guest.dynamos("revert", "version-tag-v2")
    assert VERSION_TAG not in guest.read("/proc/version")


@pytest.fixture(scope="session")
def stall_module(target, workdir) -> str:
    """The dynamos_stall test module, built on the host against the lab kernel's headers."""
    out = workdir / "stall-module"
    subprocess.run(["cp", "-r", str(LAB_MODULES / "dynamos_stall"), str(out)], check=True)
    subprocess.run(["make", "-s", "-C", str(target.headers_dir), f"M={out}", "modules"], check=True,
                   capture_output=True)
    return str(out / "dynamos_stall.ko")


def test_blocked_transition_is_reverted_and_blocker_named(guest, build, stall_module):
    pkg = build(LAB_UPDATES / "stall-breaker")
    guest.load_module(stall_module)
    try:
        found = guest.sh("grep -lx dynamos-stall /proc/[0-9]*/comm 2>/dev/null; true").split()
        assert len(found) == 1, found
        pid = found[0].split("/")[2]
        assert pid.isdigit(), "the stall kthread is not running"
        r = guest.dynamos("apply", str(pkg), "--timeout", "3", check=False)
        err = r.stderr.decode()
        assert r.status == TransitionError.exit_status, err
        assert "reverted and unloaded" in err
        assert f"{pid}" in err and "dynamos-stall" in err
        assert "dynamos_stall_loop" in err  # the blocker's stack
        assert guest.livepatches() == []
        assert "stall_breaker" not in guest.modules()
    finally:
        guest.unload_module("dynamos_stall")


def test_check_predicts_blockers_and_blockers_lists_them_mid_transition(guest, build, stall_module):
    pkg = build(LAB_UPDATES / "stall-breaker")
    guest.load_module(stall_module)
    try:
        report = json.loads(guest.dynamos("apply", str(pkg), "--check", "--json").stdout)
        assert guest.livepatches() == []  # --check loads nothing
        (blocker,) = report["predicted_blockers"]
        assert blocker["comm"] == "dynamos-stall" and blocker["functions"] == ["dynamos_stall_loop"]
        assert any("] dynamos_stall_loop+" in frame for frame in blocker["stack"]), blocker["stack"]
        # While an apply waits on the thread, `blockers` names it with its stack.
        # The apply waits long enough for two CLI runs of `blockers` even on a loaded host.
        guest.sh(f"setsid {sys.executable} -m dynamos apply {pkg} --timeout 60 >/tmp/stalled.out 2>&1 "
                 "</dev/null & for i in $(seq 120); do "
                 "[ -e /sys/kernel/livepatch/stall_breaker/transition ] && break; sleep 0.5; done; sleep 1")
        listed = json.loads(guest.dynamos("blockers", "--json").stdout)
        assert list(listed) == ["stall_breaker"]
        assert [b["comm"] for b in listed["stall_breaker"]] == ["dynamos-stall"]
        text = guest.dynamos("blockers", "stall-breaker").stdout.decode()
        assert "1 task(s) not switched yet" in text and "dynamos_stall_loop" in text
        guest.sh("while [ -d /sys/kernel/livepatch/stall_breaker ] || grep -q stall_breaker /proc/modules; "
                 "do sleep 1; done", timeout=150)
        assert "reverted and unloaded" in guest.read("/tmp/stalled.out")
    finally:
        guest.unload_module("dynamos_stall")
    assert json.loads(guest.dynamos("blockers", "--json").stdout) == {}


def test_package_for_another_release_is_refused(guest, workdir):
    out = workdir / "other-release"
    out.mkdir()
    pkg = build_update(EXAMPLES / "cmdline-banner", fetch_target("6.1.0-55-amd64"), output=out).package_path
    assert pkg.name == "cmdline-banner_6.1.0-55-amd64.dynpkg"
    before = guest.read("/proc/cmdline")
    r = guest.dynamos("apply", str(pkg), check=False)
    assert r.status == RefusedError.exit_status
    assert "6.1.0-55-amd64" in r.stderr.decode() and "6.1.0-56-amd64" in r.stderr.decode()
    assert guest.read("/proc/cmdline") == before


@pytest.mark.parametrize("member", ["manifest.json", "module.ko"])
def test_tampered_package_is_refused(guest, build, workdir, member):
    pkg = build(EXAMPLES / "cmdline-banner")
    data = bytearray(pkg.read_bytes())
    # The edition's name is in the manifest's function list (first) and module.ko's symbols (last).
    find = data.find if member == "manifest.json" else data.rfind
    at = find(b"cmdline_proc_show_banner")
    assert at > 0
    data[at] ^= 0x20
    tampered = workdir / f"tampered-{member}.dynpkg"
    tampered.write_bytes(bytes(data))
    r = guest.dynamos("apply", str(tampered), check=False)
    assert r.status == PackageError.exit_status
    assert f"{member} sha256 mismatch" in r.stderr.decode()
    assert guest.livepatches() == []


def _single_function_update(name: str, function: str, sympos: int | None = None) -> dict[str, str]:
    extra = f"sympos = {sympos}\n" if sympos else ""
    return {
        "update.toml": f'[update]\nname = "{name}"\ndescription = "lab refusal test"\n\n'
                       f'[[function]]\nname = "{function}"\nedition = "edition_{name.replace("-", "_")}"\n{extra}',
        "edition.c": f"int edition_{name.replace('-', '_')}(void) {{ return 0; }}\n",
    }


@pytest.mark.parametrize("function, reason", [
    ("dynamos_no_such_function", "not found in vmlinux"),
    ("branches_show", "ambiguous"),          # two static functions of that name in vmlinux
    ("native_sched_clock", "not traceable"),  # notrace: no fentry site for ftrace
])
def test_preflight_refusals_leave_kernel_unchanged(guest, build, function, reason, monkeypatch):
    name = f"refuse-{function.replace('_', '-')}"
    if function == "dynamos_no_such_function":
        # build checks names against the target's symbol table and refuses this one itself; a
        # package made where no table is at hand (the check skipped) still meets apply's preflight.
        import dynamos.builder.kbuild as kbuild

        with pytest.raises(UpdateSourceError, match="'dynamos_no_such_function' is not in vmlinux"):
            build(_single_function_update(name, function), f"refuse-{function}")
        monkeypatch.setattr(kbuild, "check_names", lambda *_a, **_k: None)
        name += "-unchecked"
    pkg = build(_single_function_update(name, function), f"refuse-{function}-pkg")
    before = guest.modules()
    r = guest.dynamos("apply", str(pkg), check=False)
    err = r.stderr.decode()
    assert r.status == RefusedError.exit_status, err
    assert function in err and reason in err.lower(), err
    assert "nothing" in err.lower() or "never loaded" in err.lower() or "refused" in err.lower(), err
    assert guest.modules() == before


def test_ambiguous_name_with_sympos_applies(guest, build):
    pkg = build(_single_function_update("sympos-ok", "branches_show", sympos=2), "sympos-ok")
    guest.dynamos("apply", str(pkg))
    try:
        (update,) = guest.status()["updates"]
        assert update["functions"][0]["sympos"] == 2
    finally:
        guest.dynamos("revert", "sympos-ok")


def test_non_root_is_refused(guest, build):
    pkg = build(EXAMPLES / "cmdline-banner")
    # Import everything first: the interpreter may live where an unprivileged user cannot read.
    r = guest.run(sys.executable, "-c",
                  "import os, sys; from dynamos.cli import main; import dynamos.kernel, dynamos.update.package; "
                  "os.setgid(65534); os.setuid(65534); sys.exit(main(['apply', sys.argv[1]]))", str(pkg), check=False)
    assert r.status == RefusedError.exit_status
    assert "root" in r.stderr.decode()
    assert guest.livepatches() == []


def test_lockdown_is_refused(target, workdir, build):
    """A kernel booted in lockdown (integrity) loads only modules signed by a key in its keyrings;
    the lab key is not one of them here (no UEFI db): dynamos says so, naming the key, first."""
    from dynamos.demo import guest_env
    from dynamos.lab import Lab

    pkg = build(EXAMPLES / "cmdline-banner")
    lab = Lab.boot(lab_config(target, workdir, append="lockdown=integrity"))
    try:
        assert "[integrity]" in lab.run(["cat", "/sys/kernel/security/lockdown"], timeout=30).stdout.decode()
        r = lab.run([sys.executable, "-m", "dynamos", "apply", str(pkg)], env=guest_env(), timeout=120)
        assert r.status == RefusedError.exit_status, r.stderr
        assert "kernel lockdown (integrity)" in r.stderr.decode()
        assert "none of the kernel's keyrings holds" in r.stderr.decode()
        assert lab.run(["ls", "/sys/kernel/livepatch"], timeout=30).stdout == b""
    finally:
        lab.kill()
        lab.discard()


def test_edition_using_non_exported_symbols(guest, build):
    """nr_threads, nr_running() and get_avenrun() are not exported: the update reaches them through
    livepatch relocations, and the values it prints are the kernel's own."""
    pkg = build(LAB_UPDATES / "loadavg-klp")
    from dynamos.update.package import read_package

    # wake_up_state: every update's blocker signal (signal_blockers) uses it
    assert sorted(s["name"] for s in read_package(pkg).klp_symbols) == [
        "get_avenrun", "nr_running", "nr_threads", "wake_up_state"]
    guest.dynamos("apply", str(pkg))
    try:
        out = guest.sh("cat /proc/loadavg; ls -d /proc/[0-9]*/task/* | wc -l").split("\n")
        fields = out[0].split()
        assert fields[-1] == "dynamos", out
        running, threads = (int(x) for x in fields[3].split("/"))
        assert 1 <= running <= 4
        assert abs(threads - int(out[1])) <= 3, out  # the kernel's own thread count
    finally:
        guest.dynamos("revert", "loadavg-klp")
    assert not guest.read("/proc/loadavg").strip().endswith("dynamos")


def test_unknown_non_exported_symbol_is_refused(guest, build):
    pkg = build({
        "update.toml": '[update]\nname = "klp-missing"\ndescription = "lab test"\n\n'
                       '[[function]]\nname = "loadavg_proc_show"\nedition = "show_missing"\n',
        "e.c": "#include <linux/seq_file.h>\nextern int dynamos_no_such_variable;\n"
               "int show_missing(struct seq_file *m, void *v)\n"
               "{ seq_printf(m, \"%d\\n\", dynamos_no_such_variable); return 0; }\n",
    }, "klp-missing")
    before = guest.modules()
    r = guest.dynamos("apply", str(pkg), check=False)
    assert r.status == RefusedError.exit_status
    assert "dynamos_no_such_variable" in r.stderr.decode() and "not in vmlinux" in r.stderr.decode()
    assert guest.modules() == before


def test_force_is_opt_in_and_switches_the_blocker(target, workdir, build, stall_module):
    """In a lab of its own, as forcing taints the kernel's livepatch state for good."""
    pkg = build(LAB_UPDATES / "stall-breaker")
    lab = Lab.boot(lab_config(target, workdir), state_dir=labs_dir() / f"pytest-force-{workdir.name}")
    try:
        guest = Guest(lab)
        guest.load_module(stall_module)
        r = guest.dynamos("apply", str(pkg), "--timeout", "3", "--force", "--json")
        applied = json.loads(r.stdout)
        assert b"--force: if the transition is still blocked" in r.stderr
        (note,) = [n for n in applied["notes"] if n.startswith("FORCED")]
        assert "dynamos-stall (pid" in note and "may still run the replaced code" in note
        assert guest.livepatches() == ["stall_breaker"]
        assert guest.read("/sys/kernel/livepatch/stall_breaker/transition").strip() == "0"
        assert "forcing remaining tasks to the patched state" in guest.sh("dmesg | tail -20")
        # Forcing the patching direction pins only replaced updates' modules: this one reverts.
        guest.dynamos("revert", "stall-breaker")
        assert guest.livepatches() == [] and "stall_breaker" not in guest.modules()
    finally:
        lab.kill()
        lab.discard()


def state_update(build, version: int):
    """A cumulative update of /proc/version that sets up system state 7 at ``version``."""
    name = f"state-v{version}"
    return build({
        "update.toml": f'[update]\nname = "{name}"\ndescription = "lab test"\nreplace = true\n\n'
                       '[[function]]\nname = "version_proc_show"\nedition = "version_state"\n\n'
                       f"[[state]]\nid = 7\nversion = {version}\n",
        "e.c": "#include <linux/seq_file.h>\n"
               "int version_state(struct seq_file *m, void *v)\n"
               f'{{ seq_puts(m, "dynamos state v{version}\\n"); return 0; }}\n',
    }, name)


def test_cumulative_update_with_an_older_state_version_is_refused(guest, build):
    guest.dynamos("apply", str(state_update(build, 2)))
    try:
        assert guest.read("/proc/version") == "dynamos state v2\n"
        r = guest.dynamos("apply", str(state_update(build, 1)), check=False)
        err = r.stderr.decode()
        assert r.status == RefusedError.exit_status and "never loaded" in err, err
        assert "not compatible" in err, err  # livepatch's own reason, quoted from the kernel log
        assert guest.livepatches() == ["state_v2"] and "state_v1" not in guest.modules()
        assert guest.read("/proc/version") == "dynamos state v2\n"
        applied = json.loads(guest.dynamos("apply", str(state_update(build, 3)), "--json").stdout)
        assert applied["replaced"] == ["state_v2"]
        assert guest.livepatches() == ["state_v3"] and guest.read("/proc/version") == "dynamos state v3\n"
    finally:
        for name in guest.livepatches():
            guest.dynamos("revert", name)
