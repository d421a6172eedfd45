"""dynamos: live updates of a running Linux kernel by adaptive function cloning."""

__version__ = "0.1.0"
