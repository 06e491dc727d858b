"""Placeholder: replaced by the kernel library."""
import os


def enabled() -> bool:
    return os.environ.get("MOBIQUANT_KERNELS", "on").lower() not in {"off", "0", "false"}
