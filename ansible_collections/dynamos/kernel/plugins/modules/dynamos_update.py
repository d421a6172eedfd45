#!/usr/bin/python
# GPL-2.0-only
"""Apply, install or revert a dynamos live update on the host (the action plugin of the same name
copies the package over first)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dynamos_update
short_description: Apply, install or revert a dynamos live kernel update
description:
  - Runs C(dynamos) on the host with C(--json) and returns its JSON as C(dynamos).
  - Idempotent - an update already live with the same module sha256 is C(changed=false).
  - Check mode runs C(dynamos apply --check) and returns the tasks that would block the transition.
  - Diff mode shows the host's live updates before and after.
  - The action plugin copies the package from the controller, choosing the one for the host's kernel release.
options:
  package:
    description: Package path on the controller (copied over), or the mapping/list of O(packages).
    type: raw
  packages:
    description: One package per kernel release, as C({release: path}) or a list of C(NAME_RELEASE.dynpkg) paths.
    type: raw
  state:
    description: C(present) applies, C(installed) also keeps it across reboots (C(dynamos install)),
      C(absent) reverts and uninstalls.
    type: str
    choices: [present, absent, installed]
    default: present
  name:
    description: Update (or livepatch) name for C(state=absent) without a package.
    type: str
  timeout:
    description: Seconds the transition may take (C(dynamos apply --timeout)).
    type: float
    default: 30
  force:
    description: Pass C(--force) to apply (see the dynamos README before using it).
    type: bool
    default: false
  executable:
    description: The dynamos command on the host, split like a shell would (e.g. C(/opt/venv/bin/python -m dynamos)).
    type: str
    default: dynamos
"""

RETURN = r"""
dynamos:
  description: The JSON object dynamos printed for the action taken (apply, install, revert, uninstall, apply --check).
  type: dict
  returned: always
blockers:
  description: In check mode, the tasks that would block the transition now.
  type: list
  returned: check mode
update:
  description: Update name, livepatch name and module sha256 of the package.
  type: dict
  returned: when a package is given
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.dynamos.kernel.plugins.module_utils.dynamos import Dynamos, update_summary


def find_live(status: dict, livepatch_name: str) -> dict | None:
    for u in status.get("updates", []):
        if u["name"] == livepatch_name or u.get("update") == livepatch_name:
            return u
    return None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "package": {"type": "raw"}, "packages": {"type": "raw"},
            "state": {"type": "str", "choices": ["present", "absent", "installed"], "default": "present"},
            "name": {"type": "str"}, "timeout": {"type": "float", "default": 30.0},
            "force": {"type": "bool", "default": False}, "executable": {"type": "str", "default": "dynamos"},
        },
        supports_check_mode=True,
    )
    p = module.params
    package = p["package"] if isinstance(p["package"], str) else None
    if p["state"] != "absent" and not package:
        module.fail_json(msg="dynamos_update: give package or packages (on the controller: the action plugin "
                             "copies the host's one over)")
    if p["state"] == "absent" and not package and not p["name"]:
        module.fail_json(msg="dynamos_update: state=absent needs name or package")
    dyn = Dynamos(module, p["executable"])
    before = dyn.status()
    info = None
    if package:
        info = dyn.must("info", package)
        name, sha = info["livepatch_name"], info["module_sha256"]
    else:
        name, sha = p["name"], None
    live = find_live(before, name)
    result: dict = {"changed": False, "update": info and {"update": info["update"], "livepatch_name": name,
                                                           "module_sha256": sha, "kernel": info["kernel"]}}
    same_live = bool(live and live.get("enabled") and not live.get("transition") and live.get("module_sha256") == sha)

    if p["state"] == "absent":
        installed = dyn.must("installed").get("installed", [])
        kept = [r for r in installed if r.get("livepatch_name") == name or r.get("name") == name]
        if not live and not kept:
            module.exit_json(dynamos={"ok": True, "note": f"{name} is neither live nor installed"}, **result)
        if module.check_mode:
            module.exit_json(changed=True, dynamos={"ok": True, "would": "uninstall" if kept else "revert"},
                             diff={"before": update_summary(before), "after": ""})
        if kept:
            data = dyn.must("uninstall", kept[0]["name"], "--timeout", str(p["timeout"]))
        else:
            data = dyn.must("revert", live["name"], "--timeout", str(p["timeout"]))
    else:
        if p["state"] == "installed":
            installed = dyn.must("installed").get("installed", [])
            stored = any(r.get("livepatch_name") == name and r.get("module_sha256") == sha for r in installed)
        else:
            stored = True
        if same_live and stored:
            module.exit_json(dynamos={"ok": True, "note": f"{name} is live with module sha256 {sha}"}, **result)
        if module.check_mode:
            report = dyn.must("apply", "--check", package)
            blockers = report.get("predicted_blockers", [])
            msg = f"would apply {name}"
            if blockers:
                msg += f"; {len(blockers)} task(s) would block the transition now: " + ", ".join(
                    f"{b['comm']} (pid {b['pid']}) in {', '.join(b['functions'])}" for b in blockers)
            now = "".join(update_summary(before))
            module.exit_json(changed=True, dynamos=report, blockers=blockers, msg=msg,
                             diff={"before": now, "after": now + f"{info['update']} ({name}) enabled {sha[:16]}\n"},
                             **{k: v for k, v in result.items() if k != "changed"})
        args = ["install" if p["state"] == "installed" else "apply", package, "--timeout", str(p["timeout"])]
        if p["force"] and p["state"] == "present":
            args.append("--force")
        data = dyn.must(*args, **{k: v for k, v in result.items() if k != "changed"})
    after = dyn.status()
    module.exit_json(changed=True, dynamos=data, update=result["update"],
                     diff={"before": "".join(update_summary(before)), "after": "".join(update_summary(after))})


if __name__ == "__main__":
    main()
