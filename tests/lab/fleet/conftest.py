"""Fleet tests: three labs of one vCPU and 512 MiB as Ansible hosts, driven by the real
ansible-playbook through the dynamos.kernel collection and its lab connection.

These tests do not use the session's shared lab: the autouse check of tests/lab/conftest.py is
replaced by one that leaves the three fleet labs without live updates after each test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamos.demo import guest_env
from dynamos.lab import Lab, LabConfig
from dynamos.lab.session import lab_state_dir
from dynamos.target import cache_root
from tests.lab.conftest import EXAMPLES, REPO, Guest

FLEET_UPDATES = Path(__file__).resolve().parent / "updates"
ACTION_LOG = "/var/log/dynamos/actions.log"
PLAYBOOK = EXAMPLES / "fleet" / "rollout.yml"


@dataclass
class Host:
    """One fleet lab: its inventory name and a Guest to look at it from the test."""

    name: str
    guest: Guest

    def action_log(self) -> str:
        return self.guest.sh(f"cat {ACTION_LOG} 2>/dev/null; true")

    def updates(self) -> dict[str, dict]:
        return {u["name"]: u for u in self.guest.status()["updates"]}

    def loadavg(self) -> str:
        return self.guest.read("/proc/loadavg").strip()

    def console(self) -> str:
        return self.guest.lab.console_text()


@pytest.fixture(scope="session")
def fleet(target, workdir) -> list[Host]:
    """Three labs booted at once, named so that the lab connection finds them."""
    names = [f"fleet{i}-{os.getpid()}" for i in (1, 2, 3)]
    config = LabConfig(kernel=target.release, cpus=1, memory_mb=512,
                       shares=[str(REPO), str(cache_root()), str(workdir)])

    def boot(name: str) -> Lab:
        return Lab.boot(config, state_dir=lab_state_dir(name), progress=lambda m: print(f"lab {name}: {m}",
                                                                                         file=sys.stderr))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(boot, n) for n in names]
        labs = []
        try:
            for f in futures:
                labs.append(f.result())
        except BaseException:
            for f in futures:
                if f.exception() is None:
                    f.result().kill()
                    f.result().discard()
            raise
    yield [Host(n, Guest(lab)) for n, lab in zip(names, labs, strict=True)]
    for lab in labs:
        lab.kill()
        lab.discard()


@pytest.fixture(autouse=True)
def kernel_left_as_found(fleet):
    """Each fleet test starts with no live update on any of the three labs; what a rollout left
    (on purpose: the good one stays) is reverted after the test."""
    for host in fleet:
        assert host.guest.livepatches() == [], f"{host.name}: a previous test left a live update behind"
    yield
    for host in fleet:
        host.guest.revert_leftovers()


@pytest.fixture(scope="session")
def fleet_package(build):
    """The fleet test updates (tests/lab/fleet/updates), built once per session and signed with the lab key."""
    return lambda name: build(FLEET_UPDATES / name)


def inventory(fleet: list[Host], group_vars: dict, host_vars: dict[str, dict] | None = None) -> dict:
    """The example's layout: the first lab the canary, the other two the waves."""
    host_vars = host_vars or {}
    hosts = {h.name: host_vars.get(h.name, {}) for h in fleet}
    common = {"ansible_connection": "dynamos.kernel.lab", "ansible_python_interpreter": "/usr/bin/python3",
              "ansible_remote_tmp": "/tmp/.ansible/tmp", "dynamos_executable": f"{sys.executable} -m dynamos"}
    return {"all": {"vars": {**common, **group_vars}, "children": {
        "canary": {"hosts": {fleet[0].name: hosts[fleet[0].name]}},
        "waves": {"hosts": {h.name: hosts[h.name] for h in fleet[1:]}}}}}


@dataclass
class PlayResult:
    status: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counters per host."""
        out = {}
        for m in re.finditer(r"^(\S+)\s+:\s+(.*)$", self.output.split("PLAY RECAP", 1)[-1], re.M):
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return out


@pytest.fixture
def playbook(fleet, workdir, tmp_path):
    """Run examples/fleet/rollout.yml with real ansible-playbook against the three labs."""

    def run(inv: dict, *extra: str, playbook: Path = PLAYBOOK, timeout: float = 400) -> PlayResult:
        inv_path = tmp_path / f"inventory-{len(list(tmp_path.iterdir()))}.yml"
        inv_path.write_text(json.dumps(inv, indent=1))  # JSON is YAML
        env = {**os.environ, **guest_env(), "ANSIBLE_CONFIG": str(EXAMPLES / "fleet" / "ansible.cfg"),
               "ANSIBLE_COLLECTIONS_PATH": str(REPO), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
        r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv_path),
                            str(playbook), *extra], capture_output=True, text=True, timeout=timeout, env=env)
        print(r.stdout[-20000:], r.stderr[-5000:], sep="\n", file=sys.stderr)
        return PlayResult(r.returncode, r.stdout + r.stderr)

    return run
