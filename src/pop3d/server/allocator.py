"""Keep the buffers of big replies in the heap (glibc's ``mallopt``).

A RETR of a big message makes a few buffers of about :data:`~pop3d.protocol.limits.READ_CHUNK`
octets per chunk: the read, its CRLF form, its stuffed form.  glibc serves an allocation
above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and gives freed heap above
``M_TRIM_THRESHOLD`` back to the kernel, so every chunk paid one page fault per 4 KiB page
it touched (what that cost: docs/performance.md).  Fixed thresholds a few chunks high
keep those buffers in the heap, reused from one chunk to the next; a worker then keeps at
most ``TRIM`` octets of free heap.

Only the allocator's tuning changes: nothing is allocated here.  Elsewhere than glibc
(musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

from pop3d.protocol import limits

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_chunk_buffers_in_heap"]

log = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (a chunk's buffers are at most about
#: twice READ_CHUNK: every LF of a chunk of blank lines becomes CRLF).
MMAP_THRESHOLD = 8 * limits.READ_CHUNK
#: Free heap kept before it is returned to the kernel.
TRIM_THRESHOLD = 32 * limits.READ_CHUNK


def keep_chunk_buffers_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds; False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    # Only glibc's mallopt takes these parameter numbers.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.debug("mallopt refused the thresholds")
    return done
