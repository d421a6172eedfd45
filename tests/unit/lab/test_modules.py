"""The target's modules in the lab: the module index the host writes once, the read-only share,
the overlay module in the initramfs and the setting that tells the guest's init to mount it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dynamos.errors import LabError
from dynamos.lab.initramfs import DISK_MODULES, LAB_MODULES, cached_initramfs, find_busybox, module_load_order
from dynamos.lab.machine import LabConfig, agent_files, lab_initramfs, modules_share_argv, qemu_argv
from dynamos.lab.modules import (
    MODULES_TAG,
    ensure_module_index,
    index_is_current,
    stage_modules,
)
from dynamos.target import TargetKernel

RELEASE = "6.1.0-99-amd64"


def _fake_target(root: Path, with_modules: bool = True) -> TargetKernel:
    modules = root / "kernels" / RELEASE / "lib" / "modules" / RELEASE
    if with_modules:
        (modules / "kernel").mkdir(parents=True)
        (modules / "modules.order").write_text("")
        (modules / "modules.builtin").write_text("")
    return TargetKernel(RELEASE, headers_dir=root / "headers", modules_dir=modules if with_modules else None,
                        image=None, config=None)


def test_the_module_index_is_written_once_beside_the_modules(tmp_path: Path):
    target = _fake_target(tmp_path)
    assert not index_is_current(target.modules_dir)
    said: list[str] = []
    assert ensure_module_index(target, said.append)
    assert index_is_current(target.modules_dir) and (target.modules_dir / "modules.dep").is_file()
    assert said and "depmod" in said[0]
    said.clear()
    assert ensure_module_index(target, said.append) and said == []  # already indexed: nothing run


def test_without_depmod_the_lab_says_modprobe_will_not_work(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    said: list[str] = []
    assert not ensure_module_index(_fake_target(tmp_path), said.append)
    assert "install kmod" in said[0]
    assert not ensure_module_index(_fake_target(tmp_path / "none", with_modules=False), said.append)


def test_the_modules_share_is_read_only_and_holds_the_release_dir(tmp_path: Path):
    target = _fake_target(tmp_path)
    argv = modules_share_argv(target)
    assert argv[0] == "-fsdev" and argv[2] == "-device"
    assert argv[1] == (f"local,id={MODULES_TAG},path={target.modules_dir.parent},security_model=none,"
                       "readonly=on,multidevs=remap")
    assert argv[3].endswith(f"mount_tag={MODULES_TAG}")
    assert modules_share_argv(_fake_target(tmp_path / "none", with_modules=False)) == []


def test_qemu_exports_the_modules_share(tmp_path: Path, target):
    argv = qemu_argv(target, LabConfig(), "tcg", tmp_path, tmp_path / "initrd", [])
    assert f"local,id={MODULES_TAG},path={target.modules_dir.parent},security_model=none,readonly=on," \
           "multidevs=remap" in argv


def test_overlay_is_loaded_by_the_initramfs(target):
    assert "overlay" in LAB_MODULES
    assert "overlay.ko" in [p.name for p in module_load_order(target)]


def test_lab_conf_names_the_release_whose_modules_init_mounts(tmp_path: Path, target, monkeypatch):
    monkeypatch.setenv("DYNAMOS_CACHE", str(tmp_path / "cache"))  # the base initramfs is built there
    data = lab_initramfs(target, [], "cache=loose")
    base = cached_initramfs(target, agent_files()[1].read_text(), tmp_path / "cache" / "initramfs").read_bytes()
    assert data.startswith(base)  # the base archive, then this lab's settings in one of their own
    out = tmp_path / "x"
    out.mkdir()
    for archive in (base, data[len(base):]):
        subprocess.run([str(find_busybox()), "cpio", "-i", "-d"], input=archive, cwd=out, check=True,
                       capture_output=True)
    assert f"MODULES_RELEASE={target.release}" in (out / "lab.conf").read_text().splitlines()
    assert any(p.name.endswith("-overlay.ko") for p in (out / "lib/modules").iterdir())


def _fake_module(path: Path, alias: str) -> Path:
    """A relocatable ELF with a .modinfo section: all depmod needs to index a module."""
    src = path.with_suffix(".c")
    src.write_text(f'__attribute__((section(".modinfo"), used)) static const char info[] = '
                   f'"alias={alias}\\0license=GPL\\0name={path.stem}";\n')
    subprocess.run(["gcc", "-c", "-o", str(path), str(src)], check=True)
    return path


def test_extra_modules_are_staged_with_an_index_covering_them_and_the_targets(tmp_path: Path):
    target = _fake_target(tmp_path)
    (target.modules_dir / "kernel" / "fs").mkdir()
    _fake_module(target.modules_dir / "kernel" / "fs" / "own.ko", "fs-own")
    built = tmp_path / "built"
    built.mkdir()
    extra = [_fake_module(built / "test_a.ko", "test-a"), _fake_module(built / "test_b.ko", "test-b")]
    staged = stage_modules(target, extra, tmp_path / "stage", "extra/tests")
    assert "modules.dep.bin" in staged.index and "modules.order" not in staged.index  # the package's own stays
    dep = (staged.root / "modules.dep").read_text().split()
    assert sorted(dep) == ["extra/tests/test_a.ko:", "extra/tests/test_b.ko:", "kernel/fs/own.ko:"]
    assert "alias test-a test_a" in (staged.root / "modules.alias").read_text()
    assert not (target.modules_dir / "modules.dep").exists()  # the cache is not written
    script = staged.install_script()
    dest = f"/lib/modules/{RELEASE}"
    assert f"mkdir -p {dest}/extra/tests\n" in script
    assert f"cp {staged.root}/extra/tests/test_a.ko {staged.root}/extra/tests/test_b.ko {dest}/extra/tests/\n" in script
    assert f"{staged.root}/modules.dep.bin" in script.splitlines()[-1]


@pytest.mark.parametrize("subdir", ["", "/abs", "../out", "kernel/x"])
def test_extra_modules_stay_beside_the_targets_own(tmp_path: Path, subdir: str):
    target = _fake_target(tmp_path)
    with pytest.raises(LabError):
        stage_modules(target, [_fake_module(tmp_path / "m.ko", "m")], tmp_path / "stage", subdir)


def test_a_system_lab_boots_its_disk_with_the_disk_modules(tmp_path: Path, target, monkeypatch):
    """``LabConfig(disk=...)``: the image as a virtio-blk disk, an initramfs that loads the disk
    and ext4 modules (dependencies first) and tells init to start the disk's system."""
    monkeypatch.setenv("DYNAMOS_CACHE", str(tmp_path / "cache"))
    disk = tmp_path / "root,1.ext4"
    argv = qemu_argv(target, LabConfig(disk=str(disk)), "tcg", tmp_path, tmp_path / "initrd", [])
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith(f"file={tmp_path}/root,,1.ext4,format=raw,")  # a comma cannot end the value
    assert "virtio-blk-pci,drive=rootdisk" in argv
    assert "-drive" not in qemu_argv(target, LabConfig(), "tcg", tmp_path, tmp_path / "initrd", [])
    out = tmp_path / "x"
    out.mkdir()
    data = lab_initramfs(target, [], "cache=loose", disk=True)
    base = cached_initramfs(target, agent_files()[1].read_text(), tmp_path / "cache" / "initramfs",
                            LAB_MODULES + DISK_MODULES).read_bytes()
    assert data.startswith(base)
    for archive in (base, data[len(base):]):
        subprocess.run([str(find_busybox()), "cpio", "-i", "-d"], input=archive, cwd=out, check=True,
                       capture_output=True)
    assert "ROOT_DISK=/dev/vda" in (out / "lab.conf").read_text().splitlines()
    order = [name.split("-", 1)[1] for name in (out / "lib/modules/order").read_text().split()]
    assert order.index("virtio_blk.ko") > order.index("virtio.ko")
    assert order.index("ext4.ko") > max(order.index("jbd2.ko"), order.index("mbcache.ko"))
    assert (out / "bin/switch_root").is_symlink()

