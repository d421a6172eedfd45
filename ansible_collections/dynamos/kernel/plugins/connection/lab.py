# GPL-2.0-only
"""A running dynamos lab as an Ansible host: commands and files go over the lab's command channel
(virtio-serial to the guest agent), files into paths only the guest sees, so a playbook treats a
lab as it would a machine over SSH."""

from __future__ import annotations

DOCUMENTATION = r"""
name: lab
short_description: Run commands in a dynamos lab (dynamos lab start --name NAME)
description:
  - The host is a lab started with C(dynamos lab start --name NAME); commands run as root in the guest.
  - Files are written with C(cat > PATH) and read with C(cat PATH) over the command channel, so they land in
    the guest's own file systems (its tmpfs), never in a directory shared with the controller.
  - Kernel trouble (oops, BUG, WARNING, panic) printed on the guest console while a command runs fails that
    command, unless it matches O(expect_warning).
options:
  lab:
    description: Name of the lab.
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: dynamos_lab
  expect_warning:
    description: Regex of a kernel warning a play provokes on purpose (searched in the splat's WARNING/BUG line).
    type: str
    vars:
      - name: dynamos_lab_expect_warning
    env:
      - name: DYNAMOS_LAB_EXPECT_WARNING
  command_timeout:
    description: Seconds a command may run before it is killed.
    type: float
    default: 600
    vars:
      - name: dynamos_lab_command_timeout
  pipelining:
    description: Send modules on stdin (no temporary files for them).
    type: bool
    default: true
    vars:
      - name: ansible_pipelining
"""

import shlex

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()


def put_argv(path: str) -> list[str]:
    """The guest command that stores stdin at ``path`` (the directory exists: Ansible made it)."""
    return ["/bin/sh", "-c", 'cat > "$1"', "put_file", path]


def fetch_argv(path: str) -> list[str]:
    return ["/bin/cat", "--", path]


def shell_argv(cmd: str) -> list[str]:
    """Ansible hands a connection one shell command line, as SSH would pass it to the login shell."""
    return ["/bin/sh", "-c", cmd]


def trouble_message(lab: str, what: str, lines: list[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:20])
    return (f"lab {lab}: the guest kernel reported trouble while {what} ran (set dynamos_lab_expect_warning "
            f"if the play provokes it on purpose):\n{shown}")


class Connection(ConnectionBase):
    """Commands through ``dynamos.lab.Lab.run``; the lab's lock keeps them one at a time per lab."""

    transport = "dynamos.kernel.lab"
    has_pipelining = True
    has_tty = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lab = None

    def _connect(self):
        if self._lab is None:
            try:
                from dynamos.errors import DynamosError
                from dynamos.lab.session import find_lab
            except ImportError as e:
                raise AnsibleError(f"the lab connection needs dynamos on the controller ({e})") from e
            name = self.get_option("lab")
            try:
                self._lab = find_lab(name)
            except DynamosError as e:
                raise AnsibleConnectionFailure(f"lab {name}: {e}") from e
            if self._lab is None:
                raise AnsibleConnectionFailure(f"no lab named {name!r} is running (dynamos lab start --name {name})")
            self._connected = True
        return self

    def _run(self, argv: list[str], stdin: bytes | None, what: str):
        from dynamos.errors import DynamosError

        self._connect()
        try:
            r = self._lab.run(argv, cwd="/", stdin=stdin, timeout=self.get_option("command_timeout"),
                              expect_warning=self.get_option("expect_warning") or None)
        except DynamosError as e:
            raise AnsibleConnectionFailure(f"lab {self.get_option('lab')}: {e}") from e
        if r.expected_messages:
            display.vvv(f"lab {self.get_option('lab')}: expected kernel warning: {r.expected_messages[0]}")
        if r.kernel_messages:
            raise AnsibleError(trouble_message(self.get_option("lab"), what, r.kernel_messages))
        return r

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv(f"LAB EXEC {cmd}", host=self.get_option("lab"))
        r = self._run(shell_argv(cmd), in_data, shlex.split(cmd)[0] if cmd.strip() else "a command")
        return r.status, r.stdout, r.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        display.vvv(f"LAB PUT {in_path} TO {out_path}", host=self.get_option("lab"))
        try:
            with open(in_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise AnsibleError(f"cannot read {in_path}: {e.strerror}") from e
        r = self._run(put_argv(out_path), data, "put_file")
        if r.status != 0:
            raise AnsibleError(f"lab {self.get_option('lab')}: cannot write {out_path}: "
                               f"{r.stderr.decode(errors='replace').strip()}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        display.vvv(f"LAB FETCH {in_path} TO {out_path}", host=self.get_option("lab"))
        r = self._run(fetch_argv(in_path), None, "fetch_file")
        if r.status != 0:
            raise AnsibleError(f"lab {self.get_option('lab')}: cannot read {in_path}: "
                               f"{r.stderr.decode(errors='replace').strip()}")
        with open(out_path, "wb") as f:
            f.write(r.stdout)

    def close(self):
        self._lab = None
        self._connected = False
