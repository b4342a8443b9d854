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
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(keep: bool) -> list[int]:
    """Minor page faults of each of ten steps."""
    out = subprocess.run([sys.executable, "-c", _ROUNDS, "1" if keep else "0"], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    """Once the heap has grown to a step's peak (a few steps: the blocks do not always fit the
    holes the last step left), steps take their memory from it without faulting.

    glibc's defaults sometimes get there too (its mmap threshold adapts to the blocks freed)
    and sometimes return memory to the kernel and fault it in again on every step (17k faults
    a step here, about half the runs, depending on the address layout), so only the setting's
    side is asserted.
    """
    pages = (67 << 20) // 4096  # what one step touches
    kept = _faults(True)
    assert sum(kept[-5:]) < pages // 10, kept


def test_engine_config_has_the_switch():
    from pagedllm.core.config import DeviceConfig

    assert DeviceConfig().keep_freed_memory is True
    assert DeviceConfig(keep_freed_memory=False).keep_freed_memory is False
