# GPL-2.0-only
"""Controller side of dynamos_update: pick the package for the host's kernel release, copy it
into a temporary directory on the host, run the module there, remove the copy."""

from __future__ import annotations

import os

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase

from ansible_collections.dynamos.kernel.plugins.module_utils.dynamos import PackageChoiceError, pick_package


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def host_release(self, task_vars: dict) -> str:
        """The host's running kernel release: from facts when gathered, else ``uname -r``."""
        release = task_vars.get("ansible_facts", {}).get("kernel")
        if release:
            return release
        r = self._low_level_execute_command("uname -r")
        if r["rc"] != 0:
            raise AnsibleError(f"dynamos_update: cannot read the host's kernel release: {r['stderr'] or r['stdout']}")
        return r["stdout"].strip()

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        chosen = args.pop("packages", None)
        if chosen is None:
            chosen = args.get("package")
        if chosen is None:
            return self._execute_module("dynamos.kernel.dynamos_update", module_args=args, task_vars=task_vars)
        release = self.host_release(task_vars)
        try:
            local = pick_package(chosen, release)
        except PackageChoiceError as e:
            result.update(failed=True, msg=f"dynamos_update: {e}")
            return result
        try:
            source = self._find_needle("files", local)
        except AnsibleError as e:
            result.update(failed=True, msg=f"dynamos_update: package {local}: {e}")
            return result
        tmpdir = self._make_tmp_path()
        try:
            remote = self._connection._shell.join_path(tmpdir, os.path.basename(source))
            self._transfer_file(source, remote)
            args["package"] = remote
            result.update(self._execute_module("dynamos.kernel.dynamos_update", module_args=args,
                                               task_vars=task_vars))
        finally:
            self._remove_tmp_path(tmpdir)
        result["package"] = {"local": source, "release": release}
        return result
