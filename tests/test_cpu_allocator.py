"""keep_freed_memory: freed activation-sized blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_ROUNDS = """
import resource, sys, torch
from pagedllm.core.cpu_allocator import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
def step():  # a prefill step's activations: several blocks of MBs alive at once, then freed
    blocks = [torch.empty(n >> 2).fill_(1.0) for n in (20 << 20, 7 << 20, 25 << 20, 3 << 20, 12 << 20)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, "1" if keep else "0"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 4 * (67 << 20) // 4096  # what the four steps touch
    kept, default = _faults(True), _faults(False)
    assert kept < 0.6 * default and kept < pages // 4, (kept, default, pages)


def test_engine_config_has_the_switch():
    from pagedllm.core.config import DeviceConfig

    assert DeviceConfig().keep_freed_memory is True
    assert DeviceConfig(keep_freed_memory=False).keep_freed_memory is False
