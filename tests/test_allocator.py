"""sdnet.utils.keep_freed_memory: glibc keeps freed big blocks, so a new tensor of a size just freed costs
no page faults (what made CPU training steps slow: bench/README.md). It changes the whole process for good,
so it runs in a subprocess here, not in the test process."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sdnet.utils import keep_freed_memory

PROBE = """
import json, resource, sys, torch
from sdnet.utils import keep_freed_memory
done = keep_freed_memory() if sys.argv[1] == "keep" else "defaults"
n = 2 ** 25  # 128 MiB of float32: far above glibc's default mmap threshold (at most 32 MiB)
torch.empty(n).fill_(1.0)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# a little smaller: the same size may not fit the freed block once aligned (posix_memalign asks for slack)
torch.empty(n - 2 ** 12).fill_(2.0)
print(json.dumps({"done": done, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert "preloaded allocator" in keep_freed_memory()  # returns before touching malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    runs = {mode: json.loads(subprocess.run([sys.executable, "-c", PROBE, mode], env=env, check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for mode in ("keep", "defaults")}
    assert runs["keep"]["done"] == "glibc malloc, freed memory kept (mmap off)"
    assert runs["keep"]["faults"] < 1000, runs      # the freed block reused
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" not in thp.read_text():  # with huge pages a fresh mapping faults far less
        assert runs["defaults"]["faults"] > 10000, runs  # a fresh mapping: one fault per 4 KiB page (~32k)
