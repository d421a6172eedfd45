"""The one harness of the kernel layer's tests: a simulated kernel, the production ``LiveKernel``
on it, and real update packages built for it.

Packages are real ``.dynpkg`` files (``write_package``) whose module is a simulated image, read
back by ``LiveKernel`` through ``read_package`` like on a host: the tests run the same package
contract the lab does. ``tests/unit/conftest.py`` hands one out as the ``harness`` fixture.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dynamos.abi import VMLINUX
from dynamos.builder.signing import Signer
from dynamos.kernel import ApplyResult, LiveKernel
from dynamos.kernel.trust import TrustPolicy
from dynamos.update.model import FunctionSpec, KthreadRestart, UpdateSource
from dynamos.update.package import UpdatePackage, read_package, write_package
from tests.support.simulated import SimModule, SimulatedKernel, simulated_module_image

# The scene every test starts from: (name, kind, object, traceable).
SYMBOLS: tuple[tuple[str, str, str, bool], ...] = (
    ("cmdline_proc_show", "t", VMLINUX, True),
    ("do_sys_open", "t", VMLINUX, True),
    ("vfs_read", "t", VMLINUX, True),
    ("show_map", "t", VMLINUX, True),  # show_map: two functions and a data symbol (sympos 1, 3; 2)
    ("show_map", "d", VMLINUX, False),
    ("show_map", "t", VMLINUX, True),
    ("notrace_fn", "t", VMLINUX, False),
    ("helper.isra.0", "t", VMLINUX, True),  # helper, renamed by the compiler
    ("nf_hook", "t", "nf_tables", True),
)
MODULES = ("nf_tables",)
RESTART = KthreadRestart(stop="stop_loop", start="start_loop")


def fn(name: str, *, object: str = VMLINUX, sympos: int | None = None, kthread: bool = False,
       edition: str | None = None) -> FunctionSpec:
    """A function an update replaces (edition ``<name>_v2`` unless given)."""
    return FunctionSpec(name, edition or f"{name}_v2", object=object, sympos=sympos,
                        kthread=RESTART if kthread else None)


class KernelHarness:
    """A simulated kernel with the default scene, a LiveKernel on it, and packages in ``pkgs/``."""

    def __init__(self, tmp_path: Path):
        self.sim = SimulatedKernel(  # the scene rendered once, not once per symbol
            tmp_path / "root",
            symbols=[(name, kind, obj) for name, kind, obj, _ in SYMBOLS],
            traceable=[(name, obj) for name, _, obj, traceable in SYMBOLS if traceable],
            modules={name: SimModule(name, livepatch=False) for name in MODULES},
        )
        self.packages = tmp_path / "pkgs"
        self.packages.mkdir()
        self.log_path = tmp_path / "actions.log"
        self.trusted = tmp_path / "trusted"  # the trust store: empty until a test trusts a signer
        self.trusted.mkdir()
        # Unsigned packages are allowed unless a test asks for the production policy (``use_trust``):
        # signing every simulated package would only slow the tests that are about something else.
        self.use_trust(allow_unsigned=True)

    def use_trust(self, *, allow_unsigned: bool = False, allow_older: bool = False) -> LiveKernel:
        """A LiveKernel with this trust policy over the harness' trust store (and make it ``kernel``)."""
        self.kernel = LiveKernel(self.sim.root, self.sim, poll_interval=0.1, unload_timeout=2.0,
                                 log_path=self.log_path,
                                 trust=TrustPolicy(self.trusted, allow_unsigned, allow_older))
        return self.kernel

    def trust(self, signer: Signer) -> Path:
        """Put ``signer``'s public keyring in the trust store; its path (remove it to revoke)."""
        path = self.trusted / f"{signer.fingerprint[-16:].lower()}.gpg"
        path.write_bytes(signer.trusted_keyring.read_bytes())
        return path

    # -- packages ----------------------------------------------------------------------------

    def add(self, name: str, *functions: str | FunctionSpec, replace: bool = False,
            release: str | None = None, consistency: str = "per-task",
            klp_symbols: list[dict[str, Any]] | None = None, image_names: dict[str, str] | None = None,
            signer: Signer | None = None, created: datetime | None = None, version: str | None = None,
            cves: tuple[str, ...] = (), editions: dict[str, list[str]] | None = None,
            path: Path | None = None) -> Path:
        """Write an update package replacing ``functions`` (default: cmdline_proc_show); its path
        (``path``: where, default ``pkgs/NAME.dynpkg``; ``editions``: see ``simulated_module_image``)."""
        specs = tuple(f if isinstance(f, FunctionSpec) else fn(f) for f in functions or ("cmdline_proc_show",))
        source = UpdateSource(directory=self.packages, name=name, description=f"{name} (simulated)",
                              functions=specs, c_files=(), replace=replace, consistency=consistency,
                              version=version, cves=cves)
        release = release or self.sim.kernel_release
        image = simulated_module_image(source.livepatch_name,
                             [{"name": f.name, "object": f.object, "sympos": f.sympos} for f in specs], replace,
                             global_switch=consistency == "global", editions=editions, **(image_names or {}))
        signing: dict[str, Any] = {}
        if signer is not None:  # as the builder signs: the module first, then the manifest
            image = signer.sign_module(image)
            signing = {"signer": signer.manifest_signer(), "sign": signer.sign_manifest}
        return write_package(path or self.packages / f"{name}.dynpkg", source=source, kernel_release=release,
                             vermagic=f"{release} SMP preempt mod_unload modversions ", module=image,
                             klp_symbols=klp_symbols, created=created, **signing)

    def package(self, name: str = "fix-x", *functions: str | FunctionSpec, vermagic: str | None = None,
                **kw: Any) -> UpdatePackage:
        """An update package as the kernel layer gets it (``vermagic``: one its build would refuse)."""
        pkg = read_package(self.add(name, *functions, **kw))
        if vermagic is not None:
            pkg = dataclasses.replace(pkg, manifest={**pkg.manifest, "vermagic": vermagic})
        return pkg

    def apply(self, name: str, *functions: str | FunctionSpec, replace: bool = False,
              **apply_kw: Any) -> ApplyResult:
        return self.kernel.apply(self.add(name, *functions, replace=replace), **apply_kw)

    def load_foreign(self, name: str, functions: list[dict[str, Any]], polls: int = 3) -> None:
        """A livepatch loaded by someone else (kpatch, insmod): no package, no dynamos record."""
        self.sim.init_module(simulated_module_image(name, functions))
        for _ in range(polls):
            self.sim.sleep(0.01)

    # -- what happened -----------------------------------------------------------------------

    def record(self, livepatch: str) -> Path:
        return self.sim.root / "run/dynamos/updates" / f"{livepatch}.json"

    def log(self, intents: bool = False) -> list[dict[str, Any]]:
        """The action log's entries: results only, unless ``intents`` (the journal's lines too)."""
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [e for e in entries if intents or e.get("result") != "intent"]

    def syscalls(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.sim.calls if c[0] == kind]
