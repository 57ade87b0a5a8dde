"""Small shared helpers."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import platform
import re
import signal
import tempfile
import threading
from pathlib import Path

import torch


def summary(doc: str | None) -> str:
    """A command's description for --help: its docstring's first line without the "(`... --help`)" that sends a
    reader of the source to the help (inside the help, it sent the reader to itself)."""
    first = (doc or "").strip().split("\n")[0]
    return re.sub(r"\s*\(`[^`]*--help`\)", "", first)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a job scheduler's end of a slot), met as Ctrl-C is: the commands printed nothing,
    and one landing during a save left its scratch file for good."""


def interrupted_code(err: KeyboardInterrupt) -> int:
    """The exit status a shell gives a process ended by the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(err, Terminated) else 130


def interrupted_word(err: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(err, Terminated) else "interrupted"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated (a KeyboardInterrupt), so each command's Ctrl-C path (its
    one line on what is kept, its scratch files removed) serves it too; the handler before is put back after."""
    if threading.current_thread() is not threading.main_thread():  # (signal handlers are the main thread's)
        yield
        return

    def terminate(signum, frame):
        raise Terminated
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_device() -> torch.device:
    """CUDA when available, else CPU: picked once, then passed around."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unwritable_folder(path: str | os.PathLike) -> str | None:
    """Why files cannot be written into the folder `path` (made if missing), or None: checked before long work,
    which would otherwise end in a PermissionError traceback once its results are due."""
    folder = Path(path).absolute()  # not expanded: a quoted "~/x" is written to ./~/x, so that is what is checked
    for p in (folder, *folder.parents):
        if p.is_symlink() and not p.exists():  # exists() follows the link: a dangling one (or a loop) is nothing
            return f"{p} is a symbolic link to nothing"
        if p.exists():
            existing = p
            break
    else:  # not even the root: leave it to the write
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    try:  # os.access passes /proc for root, where no file can be made (the write failed after all the work)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"cannot write in {existing} ({err.strerror or err})"
    return None


def check_dtype(x: torch.Tensor, dtype: torch.dtype, holder: str) -> None:
    """TypeError, said plainly, when `x` is not of `holder`'s dtype and no autocast will reconcile them."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input is {x.dtype} but {holder} is {dtype}: convert one (x.to(...) or model.to(...)), "
                        "or run under torch.autocast")


def check_eval_mode(model: torch.nn.Module, what: str) -> None:
    """ValueError when a BatchNorm or dropout of `model` is in training mode: `what` would run on the statistics of
    its own batches (interpolated images, attack steps) and update the running ones of a model it must not change."""
    norm_or_dropout = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
    if any(m.training for m in model.modules() if isinstance(m, norm_or_dropout)):
        raise ValueError(f"{what} needs the model in evaluation mode (its BatchNorm would use and update the statistics "
                         "of the batches it makes): call model.eval() first")


# --- command-line argument types: a bad value is an argparse error (usage line and message), not a traceback ---
def device_value(text: str) -> str:
    """--device: auto, or a torch device this machine has (cpu, cuda, cuda:1, ...)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA device(s)")
    return text



def _number(text: str, convert, ok, expected: str):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


SEED_MAX = 2 ** 31 - 1  # the app's seed box too; a seed far above it overflowed torch's manual_seed after the loading


def seed_value(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= SEED_MAX, f"a seed from 0 to {SEED_MAX}")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def fraction_value(text: str) -> float:
    """A momentum: 0 <= m < 1 (at 1 or above SGD's velocity never decays)."""
    return _number(text, float, lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)")


def lam_value(text: str) -> float:
    """A lambda, as CSCLayer and sdnet.override accept it."""
    from .csc import _check_lam
    try:
        return _check_lam(text, "every CSC layer")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def steps_value(text: str) -> int:
    """A number of FISTA steps, as CSCLayer and sdnet.override accept it."""
    from .csc import _check_steps
    try:
        return _check_steps(int(text) if text.strip().lstrip("+-").isdigit() else text, "every CSC layer")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def severity_value(text: str) -> int | float:
    """A corruption severity: 1..5 (CIFAR-10-C) or a positive float level c."""
    from .corruptions import parse_severity
    try:
        value = parse_severity(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a severity 1..5 or a positive noise level, got {text!r}")
    return value


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")  # read at start-up (torch's: at the first tensor)


def allocator_description() -> str:
    """The allocator as the environment set it up (LD_PRELOAD, glibc's MALLOC_*_ and GLIBC_TUNABLES, torch's
    THP_MEM_ALLOC_ENABLE), for a run's report: CPU timings depend on it (bench/README.md)."""
    found = [f"{k}={v}" for k, v in sorted(os.environ.items())
             if (k == "LD_PRELOAD" and v.strip()) or k.startswith("MALLOC_") or k in _ALLOCATOR_VARIABLES]
    return " ".join(found) if found else "the C library's malloc at its defaults"


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing big blocks back to the kernel.

    By default glibc serves every block of 32 MiB or more (one CSC code of 128 CIFAR images at width 64) with a
    fresh mmap and unmaps it on free, so each new tensor that size pays page faults on first touch: about
    11 ms per 32 MiB on this project's machine, ten times a pass over it, and a training step makes dozens.
    With mmap off (M_MMAP_MAX = 0) and a high trim threshold, freed blocks are reused at no cost; the price is
    a higher resident peak (bench/README.md measures both). It holds for the whole process from then on, so
    `python -m sdnet.train --keep-freed-memory` and the benchmark call it only when asked. (Blocks over ~64 MiB
    allocated by threads other than the main one may still be mapped afresh: the training loop allocates on
    the main thread.) Returns what was done, for the logs: nothing on other C libraries or when another
    allocator replaces malloc (LD_PRELOAD of tcmalloc, jemalloc, ..., which keep freed memory by themselves)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's malloc, left as it is (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        process_malloc = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return "the C library's malloc, left as it is (libc not found)"
    if process_malloc != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        how = f"LD_PRELOAD={os.environ['LD_PRELOAD']}" if os.environ.get("LD_PRELOAD", "").strip() else \
            "linked into the program"
        return f"another allocator replaces malloc ({how}), left as it is"
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    # mallopt answers 1 even to a parameter it does not know: check the effect. A 64 MiB block, far above the
    # default mmap threshold, must now come from the heap, not from a mapping of its own.
    if not hasattr(libc, "mallinfo2"):
        return "glibc malloc, freed memory kept (mmap off; not verified: no mallinfo2 before glibc 2.33)"
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks  # blocks mapped on their own so far
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    return "glibc malloc, freed memory kept (mmap off)" if block and mapped == 0 else \
        "glibc malloc, NOT changed: a 64 MiB block was still mapped on its own"
