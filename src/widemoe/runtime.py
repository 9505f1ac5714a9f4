"""Process-level CPU runtime setup: glibc allocator tuning and thread count.

glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh `mmap`, so the large
transient MoE / FFN buffers page-fault and are zero-filled on every call, and large freed blocks are
returned to the kernel (trimmed) each step. Turning mmap off (`M_MMAP_MAX = 0`) and raising the trim
threshold made the grouped-GEMM MoE layer up to 1.5x faster and dense layers up to 1.3x on the project's
2-core CPU (shared/reference/cpu-performance-detail.md §0, §4.3). The cost is that resident memory
stays at its peak.

`mallopt`'s value is a C `int`: 2**31 - 1 is the largest trim threshold; `1 << 36` would silently
become 0 and trim after every free, which is slower than the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_state: dict[str, object] = {}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    libc_name, _version = platform.libc_ver()
    if libc_name != "glibc":  # musl and others have no mallopt with these parameters
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(lib, "mallopt"):
        return None
    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mallopt.restype = ctypes.c_int
    return lib


def configure_allocator() -> bool:
    """Apply the glibc fix once per process. Returns True if it is in effect, False where unsupported."""
    if "allocator" in _state:
        return bool(_state["allocator"])
    ok = False
    lib = _glibc()
    if lib is not None:
        # mallopt returns 1 on success, 0 on error.
        ok = bool(lib.mallopt(_M_MMAP_MAX, 0)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    _state["allocator"] = ok
    return ok


def configure_cpu_runtime(num_threads: int | None = None) -> dict[str, object]:
    """Allocator fix plus torch intra-op threads (`num_threads`, or $WIDEMOE_THREADS, or torch's default).

    Idempotent and safe anywhere: on non-glibc platforms the allocator part is a no-op.
    Returns what was applied, for logs and benchmark JSON.
    """
    allocator = configure_allocator()
    env = os.environ.get("WIDEMOE_THREADS")
    source = "num_threads"
    if num_threads is None and env:
        source = "WIDEMOE_THREADS"  # the environment variable is what the user must fix: name it
        try:
            num_threads = int(env)
        except ValueError:
            raise ValueError(f"WIDEMOE_THREADS={env!r} must be an integer") from None
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"{source}={num_threads} must be >= 1")
        torch.set_num_threads(num_threads)
    return {"glibc_allocator_fix": allocator, "num_threads": torch.get_num_threads()}


__all__ = ["configure_allocator", "configure_cpu_runtime"]
