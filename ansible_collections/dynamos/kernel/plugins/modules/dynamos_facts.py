#!/usr/bin/python
# GPL-2.0-only
"""The host's live updates, effective kernel and livepatch support, as facts."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dynamos_facts
short_description: Live updates, effective kernel and livepatch support of the host
options:
  executable:
    description: The dynamos command on the host.
    type: str
    default: dynamos
"""

RETURN = r"""
ansible_facts:
  description: C(dynamos_kernel), C(dynamos_livepatch), C(dynamos_effective_kernel), C(dynamos_cves),
    C(dynamos_updates).
  type: dict
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.dynamos.kernel.plugins.module_utils.dynamos import Dynamos


def main() -> None:
    module = AnsibleModule(argument_spec={"executable": {"type": "str", "default": "dynamos"}},
                           supports_check_mode=True)
    dyn = Dynamos(module, module.params["executable"])
    status = dyn.status()
    uname = dyn.must("status", "--uname")
    module.exit_json(changed=False, ansible_facts={
        "dynamos_kernel": status.get("kernel"), "dynamos_livepatch": status.get("livepatch"),
        "dynamos_effective_kernel": uname.get("effective_kernel"), "dynamos_cves": uname.get("cves", []),
        "dynamos_updates": status.get("updates", []), "dynamos_interrupted": status.get("interrupted", []),
    })


if __name__ == "__main__":
    main()
