"""The lab: QEMU VMs running a target kernel, driven from the host."""

from dynamos.lab.session import lab_session, running_labs, start_lab, stop_lab
from dynamos.lab.vm import (
    EXIT_BOOT_FAILED,
    EXIT_KERNEL_OOPS,
    EXIT_TIMEOUT,
    CommandResult,
    Lab,
    LabConfig,
)

__all__ = [
    "EXIT_BOOT_FAILED", "EXIT_KERNEL_OOPS", "EXIT_TIMEOUT", "CommandResult", "Lab", "LabConfig",
    "lab_session", "running_labs", "start_lab", "stop_lab",
]
