"""Process-wide settings of the C allocator (glibc's ``mallopt``) for CPU inference."""

from __future__ import annotations

import ctypes
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (a larger value is refused).
_MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB in the heap for reuse; True if it took the settings.

    A prefill step allocates and frees tens of MB of activations per layer. By default glibc
    maps such blocks from the kernel on every allocation and unmaps them on free, so every
    step page-faults them in again, freshly zeroed: W1 took 330k minor faults and ran 5 % slower.
    With these settings the blocks come from the heap and freed memory stays there (up to
    2 GiB at its top), so a step reuses the pages the last one warmed. Resident memory stays
    at the peak of a step instead of falling back between steps. The engine calls this once its
    model is loaded: loading's buffers are used once, and may as well go back to the OS.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    took = libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
    took &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(took)
