"""Memory: how the C allocator treats a run's large, short-lived buffers (glibc only).

Every image passes through a few buffers of 3-4 MB (the body as read, its text, the base64
string, the image bytes), each alive for milliseconds. glibc's defaults serve them badly:

- A buffer of 128 KB or more starts out mmapped and is unmapped when freed, so the next one
  is page-faulted in again, a fault per 4 KB page: about 9 ms of kernel time per image
  (bench/alloc_bench.py), where the heap would reuse the same memory at no cost.
- glibc then raises its mmap threshold to the size of that freed buffer, so from then on
  they come from the heap anyway, but the heap is trimmed whenever its free top passes twice
  that size, and the pages are faulted in again after each trim.

`tune_for_run` fixes both thresholds (mallopt), so big buffers are reused from the heap
instead of faulted in; `give_back` (malloc_trim) returns what a burst left free, at the end
of dispatch, before the manifest and gallery are made. Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("imagebatch")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap: a 1536x1024 PNG is about 4.7 MB, 6.3 MB as
# base64; larger images (up to the 48 MB cap) still get their own mapping.
MMAP_THRESHOLD = 16 << 20
# Free memory at the top of the heap kept for the next buffers instead of trimmed each time:
# a few images' worth. `give_back` returns it all when dispatch ends.
TRIM_THRESHOLD = 64 << 20

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and platform.libc_ver()[0] == "glibc":
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
    return _libc


def tune_for_run() -> bool:
    """Keep image-sized buffers on the heap and reuse them. True when applied (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt refused the run's allocator settings; glibc defaults stay")
    return ok


def give_back() -> bool:
    """Return the heap's free pages to the system. True when the allocator released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
