"""Keep freed heap memory in the process, so large temporaries do not page-fault every call.

A decoder call allocates and frees tensors of 4 to 16 MB (the output upscaling's features), an
encoder call larger ones. glibc's malloc serves blocks above its *mmap threshold* with fresh
``mmap`` pages, and returns the top of the heap to the system once more than its *trim
threshold* is free there. Both thresholds adapt to the sizes a program frees, and whether a
given sequence of tensor sizes crosses them depends on that history: measured on one
propagation, 4064 page faults per slice (16 MB of fresh zeroed pages, 6 of 25 ms) before an
unrelated change to the decoder, none after it. Fixing the thresholds above those sizes makes
the cost predictable: the pages stay mapped and are reused.

The price is memory the process keeps after freeing it: at most :data:`TRIM_THRESHOLD` of free
heap at the top, returned to the system beyond that; blocks of :data:`MMAP_THRESHOLD` or more
(the encoders' attention matrices) are still mapped and unmapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

MMAP_THRESHOLD = 64 << 20  # bytes: blocks below this come from the reusable heap
TRIM_THRESHOLD = 256 << 20  # bytes of free heap top kept before returning it to the system

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OPT_OUT = "NAPARI_SAM_MALLOC"  # set to "default" to leave malloc as it is


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (once; idempotent).

    Called by :func:`napari_sam.speed.optimize`, i.e. whenever the fast path is used. Does
    nothing, and returns False, where malloc is not glibc's (macOS, Windows, musl), where the
    user tuned malloc through its own environment variables (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), or when the environment variable
    ``NAPARI_SAM_MALLOC`` is ``default``.

    Returns
    -------
    bool
        True when the thresholds were set.
    """
    if os.environ.get(OPT_OUT, "").strip().lower() == "default":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either threshold also switches off glibc's adaptation of both (man mallopt).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
