"""How the serving process runs: its event loop, garbage collector and allocator.

Everything here is process-wide and set once, on the main thread, before the server
starts; the command line only chooses (``--loop``).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Callable

#: mallopt() parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest M_MMAP_THRESHOLD on 64-bit systems (and pynbd's MAX_PAYLOAD).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


class LoopUnavailable(Exception):
    """The event loop asked for cannot be had (uvloop not installed)."""


def event_loop_factory(choice: str | None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the event loop to serve with: uvloop when ``choice`` is None or
    ``"uvloop"`` and it is installed, else the standard library's. Raises
    LoopUnavailable when uvloop was asked for by name and is missing."""
    if choice in (None, "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise LoopUnavailable("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def tune_gc() -> None:
    """Fewer full collections: block status builds tens of thousands of short-lived
    tuples per request, and full collections over the whole heap doubled the cost of
    merging them. Startup objects are frozen out of collection altogether; the server
    keeps few reference cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def tune_malloc(keep_bytes: int) -> bool:
    """Keep freed request buffers in the process (glibc; False elsewhere).

    Every WRITE payload, and every READ copied out (TLS), is a fresh buffer of the
    request's size (256 KiB for nbdcopy). With many in flight, glibc gives those blocks
    back to the kernel when they are freed (mmap, or trimming the heap), and the next
    requests fault zeroed pages in again (bench/README.md, TLS). Served from the heap
    and kept (up to ``keep_bytes`` free at its top: the in-flight limit), they are
    reused.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): its own policy stays
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, keep_bytes))


def tune_for_serving(keep_bytes: int) -> None:
    """Both tunings, as ``pynbd serve`` applies them right before its loop starts."""
    tune_gc()
    tune_malloc(keep_bytes)
