"""Small shared helpers."""
from __future__ import annotations

import ctypes
import os
import platform

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU: picked once, then passed around."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing big blocks back to the kernel.

    By default glibc serves every block of 32 MiB or more (one CSC code of 128 CIFAR images at width 64) with a
    fresh mmap and unmaps it on free, so each new tensor that size pays page faults on first touch: about
    11 ms per 32 MiB on this project's machine, ten times a pass over it, and a training step makes dozens.
    With mmap off (M_MMAP_MAX = 0) and a high trim threshold, freed blocks are reused at no cost; the price is
    a higher resident peak (bench/README.md measures both). It holds for the whole process from then on, so
    `python -m sdnet.train --keep-freed-memory` and the benchmark call it only when asked. Returns what was done,
    for the logs: nothing on other C libraries or under a preloaded allocator such as tcmalloc (which keeps
    freed memory by itself)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("tcmalloc", "jemalloc", "mimalloc")):
        return "a preloaded allocator (LD_PRELOAD), left as it is"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's malloc, left as it is (not glibc)"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "glibc malloc, left as it is (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_off = mallopt(_M_MMAP_MAX, 0) == 1
    trim_high = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if mmap_off and trim_high:
        return "glibc malloc, freed memory kept (mmap off)"
    return f"glibc malloc, partly changed (mmap off: {mmap_off}, trim threshold raised: {trim_high})"
