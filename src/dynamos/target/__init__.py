"""What describes a target kernel: its packages, images, symbol table and prepared source tree."""

from dynamos.target.fetch import (
    DEFAULT_LAB_KERNEL,
    TargetKernel,
    cache_root,
    debian_version,
    fetch_target,
    host_target,
    resolve_target,
    validate_release,
)

__all__ = ["DEFAULT_LAB_KERNEL", "TargetKernel", "cache_root", "debian_version", "fetch_target", "host_target",
           "resolve_target", "validate_release"]
