"""build --to's pure logic: Debian version order, bad --to versions, the changelog between two
versions, the trees' difference, per-file classification, the include graph, and what the
manifest and status make of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamos import cli
from dynamos.builder.debian import (
    CARRIED,
    NOT_BUILT,
    REFUSED,
    FileResult,
    IncludeGraph,
    ToBuild,
    _settle,
    build_to,
    built_by_config,
    changed_files,
    parse_diff_brief,
    path_refusal,
    update_name,
)
from dynamos.builder.refusals import ACCEPTED_CODES, CODES, OTHER_CODES, Refusal, code_of, first_unaccepted
from dynamos.builder.units import _compile_error
from dynamos.builder.unitsof import module_of
from dynamos.errors import BuildError, RefusedError, TargetError
from dynamos.kernel.results import KernelStatus, UpdateStatus
from dynamos.target import TargetKernel
from dynamos.target.debversion import (
    ChangelogEntry,
    check_to_version,
    compare_versions,
    cves_of,
    entries_between,
    parse_changelog,
)
from dynamos.update.manifest import debian_problem

ARCHIVE = ["6.1.192-3", "6.1.192-2", "6.1.192-1", "6.1.190-1", "6.1.187-1", "6.1.176-1", "6.1.170-3"]

CHANGELOG = """linux (6.1.192-3) bookworm-security; urgency=high

  * nfsd: preflight SEQUENCE replies before accepting a slot (CVE-2026-99362)

 -- Salvatore Bonaccorso <carnil@debian.org>  Thu, 26 Nov 2026 18:12:56 +0100

linux (6.1.192-2) bookworm-security; urgency=high

  * ext4: fix NULL folio dereference in mballoc (Closes: #1154101)
  * apparmor: fix out-of-bounds write when null terminating a label vec
    (CVE-2026-89761)

 -- Salvatore Bonaccorso <carnil@debian.org>  Mon, 16 Nov 2026 11:17:40 +0100

linux (6.1.192-1) bookworm-security; urgency=high

  * New upstream stable update:
    - io_uring/io-wq: don't lose the signal that ends work (CVE-2026-99228)

 -- Salvatore Bonaccorso <carnil@debian.org>  Mon, 9 Nov 2026 11:17:40 +0100
"""


@pytest.mark.parametrize(("a", "b", "order"), [
    ("6.1.192-3", "6.1.192-2", 1),
    ("6.1.192-10", "6.1.192-9", 1),
    ("6.1.190-1", "6.1.192-1", -1),
    ("6.1.192-2", "6.1.192-2", 0),
    ("1:6.0-1", "6.1.192-3", 1),  # the epoch wins
    ("6.1~rc1-1", "6.1-1", -1),  # ~ sorts before the end
    ("6.1.192-2+deb12u1", "6.1.192-2", 1),
    ("6.1.192-2a", "6.1.192-2+", -1),  # letters before other characters
])
def test_debian_version_order(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


def test_an_unknown_to_version_names_the_archives_versions() -> None:
    with pytest.raises(RefusedError, match=r"no linux-source-6.1 of that version; it has 6.1.192-3, 6.1.192-2"):
        check_to_version("6.1.192-2", "6.1.199-1", ARCHIVE, "linux-source-6.1")


@pytest.mark.parametrize(("to", "words"), [("6.1.192-1", "is older than the version"), ("6.1.192-2", "is the version")])
def test_a_to_version_not_newer_than_the_running_one_is_refused(to: str, words: str) -> None:
    with pytest.raises(RefusedError, match=words + r" the kernel runs \(6.1.192-2\)"):
        check_to_version("6.1.192-2", to, ARCHIVE, "linux-source-6.1")
    check_to_version("6.1.192-2", "6.1.192-3", ARCHIVE, "linux-source-6.1")  # the next one is fine


def _target(tmp_path: Path, version: str) -> TargetKernel:
    (tmp_path / "boot").mkdir()
    (tmp_path / "debian-version").write_text(version + "\n")
    return TargetKernel("6.1.0-56-amd64", tmp_path, None, tmp_path / "boot" / "vmlinuz-6.1.0-56-amd64", None)


@pytest.mark.parametrize("to", ["6.1.192-1", "6.1.192-2", "7.0-1"])
def test_build_to_refuses_bad_versions_before_fetching_anything(tmp_path: Path, to: str) -> None:
    with pytest.raises(RefusedError, match=rf"--to {to}"):
        build_to(_target(tmp_path, "6.1.192-2"), to, output=tmp_path, known_versions=ARCHIVE)


def test_changelog_entries_between_two_versions_and_their_cves() -> None:
    entries = parse_changelog(CHANGELOG)
    assert [e.version for e in entries] == ["6.1.192-3", "6.1.192-2", "6.1.192-1"]
    assert entries[1].lines == ("ext4: fix NULL folio dereference in mballoc (Closes: #1154101)",
                                "apparmor: fix out-of-bounds write when null terminating a label vec (CVE-2026-89761)")
    assert entries[2].lines == ("New upstream stable update:",
                                "io_uring/io-wq: don't lose the signal that ends work (CVE-2026-99228)")
    between = entries_between(entries, "6.1.192-1", "6.1.192-3")
    assert [e.version for e in between] == ["6.1.192-3", "6.1.192-2"]
    assert cves_of(between) == ["CVE-2026-89761", "CVE-2026-99362"]
    assert cves_of(entries_between(entries, "6.1.192-2", "6.1.192-3")) == ["CVE-2026-99362"]
    assert ChangelogEntry("1", "x", ("a", "b")).to_text() == "1: a | b"


def test_diff_brief_output_as_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    out = (f"Files {old}/fs/nfsd/nfs4state.c and {new}/fs/nfsd/nfs4state.c differ\n"
           f"Only in {new}/drivers: added.c\n"
           f"Only in {old}/scripts: generated-tool\n"
           f"Only in {new}: NEWFILE\n")
    assert [(c.path, c.kind) for c in parse_diff_brief(out, old, new)] == [
        ("NEWFILE", "added"), ("drivers/added.c", "added"), ("fs/nfsd/nfs4state.c", "modified")]


def test_changed_files_of_two_real_trees_cached(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for tree, text in ((old, "int a;\n"), (new, "int b;\n")):
        (tree / "fs").mkdir(parents=True)
        (tree / "fs/x.c").write_text(text)
        (tree / "fs/same.c").write_text("same\n")
    (old / "fs/x.o").write_bytes(b"built")  # the prepared tree's outputs are not changes
    cache = tmp_path / "diff.json"
    assert [(c.path, c.kind) for c in changed_files(old, new, cache, lambda _m: None)] == [("fs/x.c", "modified")]
    (new / "fs/same.c").write_text("changed after the cache\n")
    assert [c.path for c in changed_files(old, new, cache, lambda _m: None)] == ["fs/x.c"]


@pytest.mark.parametrize(("path", "decided"), [
    ("fs/nfsd/Makefile", (REFUSED, "build-file")),
    ("drivers/net/Kconfig", (REFUSED, "build-file")),
    ("arch/x86/entry/entry_64.S", (REFUSED, "assembly")),
    ("arch/x86/entry/vdso/vclock_gettime.c", (REFUSED, "vdso")),
    ("Documentation/admin-guide/x.rst", (NOT_BUILT, "not-kernel-code")),
    ("tools/perf/builtin.c", (NOT_BUILT, "not-kernel-code")),
    ("debian/changelog", (NOT_BUILT, "not-kernel-code")),
    ("fs/nfsd/nfs4state.c", None),
    ("include/linux/fs.h", None),
])
def test_files_decided_by_their_path(path: str, decided: tuple[str, str] | None) -> None:
    assert path_refusal(path) == decided


def test_a_builder_error_carries_its_code_and_one_without_gets_a_sensible_one() -> None:
    assert code_of(BuildError("anything at all", code="fidelity")) == "fidelity"
    assert code_of(BuildError("module foo is not found, the build failed")) == "other"  # no guessing from words
    assert code_of(BuildError("fs/a.h: struct req changes layout")) == "other"  # the layout check sets its code
    assert code_of(TargetError("module foo not found under /lib/modules")) == "other"
    assert first_unaccepted(["init-exit", "fidelity", "notrace"]) == "fidelity"
    assert first_unaccepted(["notrace", "init-exit"]) == "notrace"
    assert set(CODES) == set(ACCEPTED_CODES) | set(OTHER_CODES) and len(CODES) == len(set(CODES))


def test_a_compile_failure_is_coded_build_failed() -> None:
    log = "$ make\nfs/a.c:12:5: error: 'x' undeclared (first use in this function)\n"
    error = _compile_error(log, ["fs/a.c"], "patched", "6.1.0-56-amd64", 2)
    assert error.code == "build-failed" and (error.path, error.line) == (Path("fs/a.c"), 12)


def test_include_graph_reaches_the_units_through_headers(tmp_path: Path) -> None:
    files = {
        "include/linux/a.h": "struct a;\n",
        "include/linux/b.h": "#include <linux/a.h>\n",
        "fs/x.c": "#include <linux/b.h>\nint x;\n",
        "fs/y.c": '#include "local.h"\n',
        "fs/local.h": "#include <linux/a.h>\n",
        "fs/z.c": "#include <linux/other.h>\n",
        "kernel/sched/build.c": '#include "core.c"\n',
        "kernel/sched/core.c": "#include <linux/a.h>\n",
        "arch/arm/kernel/arm.c": "#include <linux/a.h>\n",  # another architecture's
        "tools/t.c": "#include <linux/a.h>\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = IncludeGraph.scan(tmp_path, lambda _m: None)
    assert graph.units("include/linux/a.h") == ["fs/x.c", "fs/y.c", "kernel/sched/build.c"]
    assert graph.units("fs/local.h") == ["fs/y.c"]


def test_built_by_config_reads_the_directorys_makefile(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs/Makefile").write_text("obj-y += always.o\nobj-$(CONFIG_FOO) += foo.o \\\n\tbar.o\n"
                                          "obj-$(CONFIG_EXT2_FS) += ext2.o\next2-y := inode.o super.o\n")
    target = TargetKernel("6.1.0-56-amd64", tmp_path, tmp_path / "modules", None, None)
    (tmp_path / "modules/kernel").mkdir(parents=True)
    assert built_by_config(tmp_path, "fs/always.c", {}, target) is True
    assert built_by_config(tmp_path, "fs/foo.c", {"CONFIG_FOO": "y"}, target) is True
    assert built_by_config(tmp_path, "fs/bar.c", {"CONFIG_FOO": "n"}, target) is False
    assert built_by_config(tmp_path, "fs/unknown.c", {}, target) is None
    assert built_by_config(tmp_path, "fs/inode.c", {"CONFIG_EXT2_FS": "n"}, target) is False  # composite
    # a module the target does not ship: not built; shipped: built
    assert built_by_config(tmp_path, "fs/foo.c", {"CONFIG_FOO": "m"}, target) is False
    (tmp_path / "modules/kernel/foo.ko").write_bytes(b"")
    assert built_by_config(tmp_path, "fs/foo.c", {"CONFIG_FOO": "m"}, target) is True


def test_a_file_of_a_directory_without_a_makefile_belongs_to_the_module_its_parent_names(tmp_path: Path) -> None:
    """drivers/hid/intel-ish-hid/ishtp/ has no Makefile: its parent's builds ishtp/bus.o into
    intel-ishtp.ko. Taken for vmlinux, bus.c failed the fidelity check against the kernel's text."""
    ish = tmp_path / "drivers/hid/intel-ish-hid"
    (ish / "ishtp").mkdir(parents=True)
    (ish / "Makefile").write_text("obj-$(CONFIG_INTEL_ISH_HID) += intel-ishtp.o\n"
                                  "intel-ishtp-objs := ishtp/init.o\nintel-ishtp-objs += ishtp/bus.o\n"
                                  "obj-y += ishtp/builtin.o\n")
    config = {"CONFIG_INTEL_ISH_HID": "m"}
    assert module_of(tmp_path, "drivers/hid/intel-ish-hid/ishtp/bus.c", config) == "intel_ishtp"
    assert module_of(tmp_path, "drivers/hid/intel-ish-hid/ishtp/builtin.c", config) is None
    assert module_of(tmp_path, "drivers/hid/intel-ish-hid/ishtp/unnamed.c", config) is None
    target = TargetKernel("6.1.0-56-amd64", tmp_path, tmp_path / "modules", None, None)
    (tmp_path / "modules/kernel").mkdir(parents=True)
    (tmp_path / "modules/kernel/intel-ishtp.ko").write_bytes(b"")
    assert built_by_config(tmp_path, "drivers/hid/intel-ish-hid/ishtp/bus.c", config, target) is True
    # a directory with its own Makefile keeps its own answer, even where a parent names the path
    (ish / "ishtp/Makefile").write_text("obj-y += bus.o\n")
    assert module_of(tmp_path, "drivers/hid/intel-ish-hid/ishtp/bus.c", config) is None


def test_a_files_status_follows_its_units() -> None:
    results = {p: FileResult(p, "modified", CARRIED, units=u) for p, u in (
        ("fs/a.c", ["fs/a.c"]), ("include/h.h", ["fs/a.c", "fs/b.c"]), ("fs/c.c", ["fs/c.c"]),
        ("fs/d.h", ["fs/d.c"]), ("fs/e.c", ["fs/e.c"]))}
    _settle(results, {"fs/a.c": Refusal("changed-initialiser", "data changed: static variable x has a different "
                                                               "initial value"),
                      "fs/e.c": Refusal("not-built", "fs/e.c: module e not found under /lib/modules")},
            ["fs/b.c", "fs/d.c"])
    got = {p: (r.status, r.code) for p, r in results.items()}
    assert got == {"fs/a.c": (REFUSED, "changed-initialiser"), "include/h.h": (REFUSED, "changed-initialiser"),
                   "fs/c.c": (CARRIED, ""), "fs/d.h": (NOT_BUILT, "not-built"), "fs/e.c": (NOT_BUILT, "not-built")}


def test_a_headers_reason_counts_the_candidates_the_compiler_confirmed() -> None:
    results = {p: FileResult(p, "modified", CARRIED, units=u) for p, u in (
        ("include/a.h", ["fs/a.c", "fs/b.c", "fs/c.c"]), ("include/n.h", ["fs/a.c", "fs/b.c"]),
        ("fs/a.c", ["fs/a.c"]))}
    includes = {"fs/a.c": ["include/a.h"], "fs/c.c": ["include/a.h"]}
    not_including = {"fs/a.c": ["include/n.h"], "fs/b.c": ["include/a.h", "include/n.h"]}
    _settle(results, {}, [], not_including, includes)
    a, n, c = results["include/a.h"], results["include/n.h"], results["fs/a.c"]
    assert (a.status, a.reason) == (CARRIED, "the compiler confirmed 2 of 3 candidate unit(s); 1 does not include it "
                                             "under this config")
    assert (n.status, n.code) == (NOT_BUILT, "not-built")
    assert n.reason == ("no unit that includes it under this config is built; the compiler confirmed 0 of 2 "
                        "candidate unit(s); 2 do not include it under this config")
    assert (c.status, c.reason) == (CARRIED, "")  # a .c file is its own unit: nothing to confirm


def test_a_partial_update_claims_no_cve() -> None:
    files = [FileResult("fs/a.c", "modified", CARRIED), FileResult("fs/b.c", "modified", REFUSED, "notrace")]
    partial = ToBuild("linux-source-6.1", "6.1.192-2", "6.1.192-3", files, [], ["CVE-2026-99362"],
                      Path("/x.dynpkg"), 1.0)
    assert partial.partial and partial.cves == [] and partial.not_carried == ["fs/b.c"]
    data = partial.to_json()
    assert data["cves"] == [] and data["cves_mentioned"] == ["CVE-2026-99362"]
    assert data["counts"] == {"carried": 1, "refused": 1, "not-built": 0}
    whole = ToBuild("linux-source-6.1", "6.1.192-2", "6.1.192-3", files[:1], [], ["CVE-2026-99362"],
                    Path("/x.dynpkg"), 1.0)
    assert not whole.partial and whole.cves == ["CVE-2026-99362"]


def test_update_names_differ_per_version_so_a_later_build_replaces_an_earlier() -> None:
    assert update_name("6.1.192-3") == "linux-6-1-192-3"
    assert update_name("6.1.192-3") != update_name("6.1.192-4")


DEBIAN = {"package": "linux-source-6.1", "from": "6.1.192-2", "to": "6.1.192-3", "partial": True,
          "not_carried": ["fs/b.c"], "changelog": ["6.1.192-3: x"], "cves_mentioned": ["CVE-2026-99362"]}


def test_the_manifests_debian_table_is_checked() -> None:
    assert debian_problem(DEBIAN) is None
    assert "keys" in (debian_problem({**DEBIAN, "extra": 1}) or "")
    assert "partial" in (debian_problem({**DEBIAN, "partial": "no"}) or "")
    assert "from" in (debian_problem({**DEBIAN, "from": "not a version!"}) or "")
    assert "lists of strings" in (debian_problem({**DEBIAN, "not_carried": [1]}) or "")


def test_status_shows_the_effective_debian_version() -> None:
    def update(name: str, debian: dict | None, enabled: bool = True) -> UpdateStatus:
        return UpdateStatus(name, enabled, False, True, True, debian=debian)
    status = KernelStatus("6.1.0-56-amd64", True, [update("other", None)])
    assert status.effective_version is None and "effective_version" not in status.to_json()
    status.updates.append(update("linux_6_1_192_3", DEBIAN))
    assert status.effective_version == "6.1.192-2, live-updated to 6.1.192-3; 1 file not carried: fs/b.c"
    status.updates[-1] = update("linux_6_1_192_3", {**DEBIAN, "not_carried": []})
    assert status.to_json()["effective_version"] == "6.1.192-2, live-updated to 6.1.192-3"
    status.updates[-1] = update("linux_6_1_192_3", DEBIAN, enabled=False)  # reverted: not serving
    assert status.effective_version is None


@pytest.mark.parametrize("argv", [
    ["build", "--to", "6.1.192-3", "--patch", "x.patch"],
    ["build", "src", "--to", "6.1.192-3"],
    ["build", "--patch", "x.patch", "--max-units", "5"],
    ["build", "--to", "6.1.192-3", "--max-units", "0"],
])
def test_build_to_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*argv, "--json"]) == 64
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["exit_status"] == 64


def test_built_by_config_follows_parent_directories_composite_options_and_architectures(tmp_path: Path) -> None:
    """Found by the stable release bench: files the config does not build were called built."""
    for rel, text in {
        "mm/Makefile": "obj-y += memory.o\nobj-$(CONFIG_DAMON) += damon/\nobj-$(CONFIG_KFENCE) += kfence/\n",
        "mm/damon/Makefile": "obj-y += core.o\n",
        "mm/kfence/Makefile": "obj-y := core.o\n",
        "net/Makefile": "obj-$(CONFIG_BRIDGE) += bridge/\n",
        "net/bridge/Makefile": "obj-$(CONFIG_BRIDGE) += bridge.o\nbridge-y := br.o br_fdb.o\n"
                               "bridge-$(CONFIG_BRIDGE_CFM) += br_cfm.o br_cfm_netlink.o\n"
                               "bridge-$(CONFIG_BRIDGE_MRP) += br_mrp.o\nbridge-y += br_mrp.o\n",
        "arch/arm64/kernel/Makefile": "obj-y += ptrace.o\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    target = TargetKernel("6.1.0-56-amd64", tmp_path, tmp_path / "modules", None, None)
    (tmp_path / "modules/kernel").mkdir(parents=True)
    (tmp_path / "modules/kernel/bridge.ko").write_bytes(b"")
    config = {"CONFIG_KFENCE": "y", "CONFIG_BRIDGE": "m"}
    assert built_by_config(tmp_path, "mm/damon/core.c", config, target) is False  # mm/ enters damon/ only if set
    assert built_by_config(tmp_path, "mm/kfence/core.c", config, target) is True
    assert built_by_config(tmp_path, "net/bridge/br_cfm.c", config, target) is False  # only under BRIDGE_CFM
    assert built_by_config(tmp_path, "net/bridge/br_cfm.c", {**config, "CONFIG_BRIDGE_CFM": "y"}, target) is True
    assert built_by_config(tmp_path, "net/bridge/br_mrp.c", config, target) is True  # also in bridge-y
    assert built_by_config(tmp_path, "net/bridge/br.c", config, target) is True
    assert built_by_config(tmp_path, "arch/arm64/kernel/ptrace.c", config, target) is False
