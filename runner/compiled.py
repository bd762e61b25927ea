"""CPU loops compiled with numba, where one loop makes a single pass over memory that ATen makes in
several: the interval bounds (runner/bounds/fused.py), PGD's L-inf step (runner/attacks.py) and the
random crops of the in-memory loader (runner/data.py). Each loop gives the bits of the ATen formulation
it replaces (the elided IBP head's radius, a sum, to rounding), which stays the path for CUDA, other
dtypes and an install without numba.

numba is imported on first use: a run that never calls a loop does not pay for the import. Each loop is
compiled once per machine (cached next to its module or in numba's user cache).
"""

import functools


@functools.cache
def numba_module():
    """numba, or None where it does not import (a trimmed install runs on the ATen paths)."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def jit(loop):
    """`loop` compiled without the GIL, cached on disk where a cache location is writable."""
    numba = numba_module()
    try:
        return numba.njit(cache=True, nogil=True)(loop)
    except RuntimeError:  # no writable cache location (a read-only install): compile once per process
        return numba.njit(nogil=True)(loop)


def flat(t):
    """A tensor's memory as a 1-D numpy array the loops read and write (a view for a contiguous CPU tensor)."""
    return t.detach().reshape(-1).numpy()
