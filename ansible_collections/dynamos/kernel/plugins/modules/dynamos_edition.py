#!/usr/bin/python
# GPL-2.0-only
"""Switch, reset or retire an edition of a multi-edition function, idempotently."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dynamos_edition
short_description: Choose which edition of a live update's function serves calls
options:
  update:
    description: Update name (as C(dynamos status) shows it).
    type: str
    required: true
  function:
    description: Kernel function of the update.
    type: str
    required: true
  edition:
    description: Edition index or name (for C(switched) and C(retired)).
    type: str
  state:
    description: C(switched) makes the edition the default route, C(reset) goes back to the route the update
      loaded with, C(retired) takes the edition out of service.
    type: str
    choices: [switched, reset, retired]
    default: switched
  persist:
    description: Keep the route with the installed package (C(switch --persist)).
    type: bool
    default: false
  timeout:
    description: Seconds a retire waits for calls in the edition to finish.
    type: float
    default: 10
  executable:
    description: The dynamos command on the host.
    type: str
    default: dynamos
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.dynamos.kernel.plugins.module_utils.dynamos import Dynamos


def function_state(status: dict, update: str, function: str) -> dict | None:
    for u in status.get("updates", []):
        if update in (u["name"], u.get("update")):
            for f in u.get("editions", []):
                if f["function"] == function:
                    return f
    return None


def edition_index(state: dict, edition: str) -> int | None:
    for e in state["editions"]:
        if edition in (str(e["index"]), e["name"]):
            return int(e["index"])
    return None


def main() -> None:
    module = AnsibleModule(argument_spec={
        "update": {"type": "str", "required": True}, "function": {"type": "str", "required": True},
        "edition": {"type": "str"}, "state": {"type": "str", "choices": ["switched", "reset", "retired"],
                                              "default": "switched"},
        "persist": {"type": "bool", "default": False}, "timeout": {"type": "float", "default": 10.0},
        "executable": {"type": "str", "default": "dynamos"}}, supports_check_mode=True)
    p = module.params
    dyn = Dynamos(module, p["executable"])
    before = function_state(dyn.status(), p["update"], p["function"])
    if before is None:
        module.fail_json(msg=f"dynamos_edition: {p['update']} has no multi-edition function {p['function']} live")
    if p["state"] != "reset":
        if p["edition"] is None:
            module.fail_json(msg=f"dynamos_edition: state={p['state']} needs edition")
        index = edition_index(before, p["edition"])
        if index is None:
            names = ", ".join(f"{e['index']} ({e['name']})" for e in before["editions"])
            module.fail_json(msg=f"dynamos_edition: {p['function']} has no edition {p['edition']!r} (it has {names})")
    if p["state"] == "switched":
        done = before["route"] == [f"default {index}"]
        args = ["switch", p["update"], p["function"], str(index)] + (["--persist"] if p["persist"] else [])
    elif p["state"] == "retired":
        done = not any(e["index"] == index and e["live"] for e in before["editions"])
        args = ["retire", p["update"], p["function"], str(index), "--timeout", str(p["timeout"])]
    else:
        done = None  # the loaded route is only known to dynamos: compare before and after
        args = ["switch", p["update"], p["function"], "--reset"] + (["--persist"] if p["persist"] else [])
    if done:
        module.exit_json(changed=False, route=before["route"], editions=before["editions"])
    if module.check_mode:
        module.exit_json(changed=True, route=before["route"])
    data = dyn.must(*args)
    after = function_state(dyn.status(), p["update"], p["function"]) or before
    changed = True if done is False else (after["route"] != before["route"])
    module.exit_json(changed=changed, dynamos=data, route=after["route"], editions=after["editions"],
                     diff={"before": "\n".join(before["route"]) + "\n", "after": "\n".join(after["route"]) + "\n"})


if __name__ == "__main__":
    main()
