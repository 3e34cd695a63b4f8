"""A process's memory: what it holds now and at its peak, what the machine has free, and giving
freed memory back to the operating system between steps of long work.

glibc's malloc serves tensors from its heap once freeing a large one has raised its mmap
threshold, and a heap fragmented by tensors of changing shapes (recovery batches of different
lengths) keeps its free pages resident. ``malloc_trim(0)`` hands them back (``madvise``) without
moving anything: after each recovery step, the first 12 steps of a recovery of the packaged
model peaked at 8.7 GB instead of 10.3 GB, with the same weights bit for bit and the same time
(README, Recovery). A fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``) reached 7.1 GB but cost
40% more time: every large temporary was page-faulted afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (Linux's MemAvailable; None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory since it started.

    Linux's VmHWM, which a forked child does not inherit (``ru_maxrss`` is carried over fork,
    so a measuring child would report its parent's peak); elsewhere ``ru_maxrss`` (bytes on
    macOS, KiB on other Unix); None where neither exists (Windows)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@functools.cache
def _libc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; False where there is no way to (not glibc).

    Call it between steps, never from a signal handler or another thread's allocation: it takes
    the allocator's locks."""
    trim = _libc_trim()
    if trim is None:
        return False
    trim(0)
    return True
