"""sdnet.utils.keep_freed_memory: glibc keeps freed big blocks, so a new tensor of a size just freed costs
no page faults (what made CPU training steps slow: bench/README.md). It changes the whole process for good,
so it runs in subprocesses here, not in the test process."""
import json
import os
import platform
import subprocess
import sys

import pytest


PROBE = """
import ctypes, json, resource, sys, torch
import sdnet.utils
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so a fresh mapping faults per page
if sys.argv[1] == "wrong":
    sdnet.utils._M_MMAP_MAX = -99  # a parameter glibc does not know (mallopt still answers 1)
done = sdnet.utils.keep_freed_memory() if sys.argv[1] != "defaults" else "defaults"
n = 2 ** 25  # 128 MiB of float32: far above glibc's default mmap threshold (at most 32 MiB)
torch.empty(n).fill_(1.0)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# a little smaller: the same size may not fit the freed block once aligned (posix_memalign asks for slack)
torch.empty(n - 2 ** 12).fill_(2.0)
print(json.dumps({"done": done, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def test_another_allocator_is_left_alone():
    """Under LD_PRELOAD of another malloc (here tcmalloc, when installed) nothing is changed, and it says so."""
    tcmalloc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    if not os.path.exists(tcmalloc):
        pytest.skip("libtcmalloc-minimal4 is not installed")
    code = "import sdnet.utils; print(sdnet.utils.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LD_PRELOAD=tcmalloc), check=True,
                         capture_output=True, text=True).stdout
    assert "another allocator replaces malloc" in out


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = {mode: json.loads(subprocess.run([sys.executable, "-c", PROBE, mode], env=env, check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for mode in ("keep", "defaults", "wrong")}
    if runs["keep"]["done"].startswith("another allocator"):  # a Python built with its own malloc (seen on a GPU machine)
        assert runs["keep"]["done"].endswith("(linked into the program), left as it is"), runs
        pytest.skip("this Python's malloc is not glibc's: " + runs["keep"]["done"])
    assert runs["keep"]["done"] == "glibc malloc, freed memory kept (mmap off)"
    assert runs["keep"]["faults"] < 1000, runs      # the freed block reused
    assert runs["defaults"]["faults"] > 10000, runs  # a fresh mapping: one fault per 4 KiB page (~32k)
    # the function checks the effect, not mallopt's answer: a setting that did nothing is reported
    assert runs["wrong"]["done"].startswith("glibc malloc, NOT changed"), runs
    assert runs["wrong"]["faults"] > 10000, runs


def test_the_description_names_environment_settings(monkeypatch):
    from sdnet.utils import allocator_description
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")]:
        monkeypatch.delenv(k)
    assert allocator_description() == "the C library's malloc at its defaults"
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert allocator_description() == "MALLOC_MMAP_MAX_=0"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # torch's own allocator asking for huge pages
    assert allocator_description() == "MALLOC_MMAP_MAX_=0 THP_MEM_ALLOC_ENABLE=1"
