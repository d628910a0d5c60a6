"""Keep freed memory in the process, so that a training step does not page-fault.

Every step allocates the same large temporaries (im2col patches, activations,
gradients: a few MB each). glibc serves blocks above its mmap threshold with fresh
``mmap`` calls and returns freed heap tops to the kernel, so each step would touch
new pages and fault on every one of them: measured here, that made a batch-32
step 1.8x slower (3.7 ms against 2.0 ms). Raising the mmap and trim thresholds
keeps those blocks on the heap for reuse. Nothing changes on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory(mmap_threshold: int = 512 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 64 << 20) -> bool:
    """Tune glibc's malloc once per process; True when it applied (glibc on Linux)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, mmap_threshold),
                                                (M_TRIM_THRESHOLD, trim_threshold),
                                                (M_TOP_PAD, top_pad)))
    return _done
