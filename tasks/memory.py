"""Memory: how the C allocator treats a run's large, short-lived buffers (glibc only).

Every image passes through a few buffers of 3-4 MB (the body as read, its text, the base64
string, the image bytes), each alive for milliseconds. glibc's defaults serve them badly: the
first ones are mmapped and unmapped when freed; glibc then raises its mmap threshold to their
size, so later ones come from the heap, which it trims whenever its free top passes twice that
size (and the next answers fault the pages in again), while holes between live objects are
never trimmed at all: after a burst of answers, up to 240 MB stayed free but held until the
process ended (mallinfo2 inside the payload bench's client, docs/design.md "The allocator").

`tune_for_run` fixes both thresholds (mallopt), so image-sized buffers are reused from the
heap; `give_back` (malloc_trim) returns the free pages when dispatch ends, before the
manifest and gallery are made. Elsewhere (musl, macOS) both do nothing.
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
