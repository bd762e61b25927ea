"""CPU allocator setting for training processes.

glibc's malloc hands large freed blocks back to the OS (mmap'd chunks, heap trimming), so every
activation-sized CPU tensor a training step creates is fresh memory that page-faults on first touch.
Measured on a 2-core CPU: an elementwise op on a [128, 32, 15, 15] tensor costs ~1 ms instead of ~0.1 ms,
an IBP step (many interval temporaries) 18% more, a plain step 5% more. Keeping freed memory in the
process, as jemalloc and tcmalloc do (Intel's PyTorch CPU tuning guide recommends them), removes that.
`ROBUST_TRAIN_MALLOC=system` keeps glibc's defaults; other C libraries are left alone.
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks below this come from the reusable heap, not fresh mmaps
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before it is returned

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); True when the setting is in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("ROBUST_TRAIN_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator, its own behaviour
        return False
