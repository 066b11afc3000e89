"""Give a new llama context's KV cache pages back to the kernel until they are written.

llama.cpp clears every KV buffer with ``memset`` when it creates a context, which makes the whole
cache resident at once: with a KV stream per slot (the engine's default) 8 slots of 4,096 cells
on Gemma 3 270M hold 576 MiB from the first second, though idle slots never write a cell. This
module finds those buffers right after creation and returns their pages with
``madvise(MADV_DONTNEED)``; a page comes back (zero-filled, as the kernel hands out anonymous
memory) the first time llama.cpp writes a cell into it. Resident KV memory then follows the cells
slots have written, not ``n_parallel x n_ctx``.

How the buffers are found: llama.cpp logs each KV buffer's size at creation ("CPU KV buffer size
= 480.00 MiB"), which :func:`kv_buffer_sizes` reads from the lines captured during the call; the
buffers are in anonymous memory mapped during the call (glibc serves large allocations with
``mmap``). :func:`zero_runs` scans those mappings for runs of resident pages that hold only zero
bytes, and a run whose length matches a logged size (to within a page at each end) is released.

Invariants: only whole pages that are resident and contain only zero bytes are released, so
releasing is invisible to any reader (a private anonymous page released with ``MADV_DONTNEED``
reads back as zeros): the cache llama.cpp sees is bit for bit the one it made. Only address
ranges mapped during the call are searched (never memory another context or thread held before),
context creation is serialised (``agent.engine.native``), and it runs before the context is handed
to its decode thread, so nothing writes those pages concurrently. Anything
unexpected (no ``/proc/self/maps``, no size logged, no matching run) releases nothing and the
memory stays as llama.cpp left it. Linux only; elsewhere every function is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "Region",
    "anon_regions",
    "kv_buffer_sizes",
    "match_runs",
    "release",
    "release_kv_pages",
    "zero_runs",
]

Region = tuple[int, int]
"""``[start, end)`` byte addresses."""

MADV_DONTNEED = 4
_SIZE_LINE = re.compile(r"KV buffer size\s*=\s*([0-9.]+)\s*MiB")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _c() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def anon_regions(maps: str | None = None) -> list[Region]:
    """Anonymous read-write private mappings of this process (``/proc/self/maps`` lines without a
    path); ``[]`` where there is no such file."""
    if maps is None:
        try:
            with open("/proc/self/maps", encoding="ascii") as f:
                maps = f.read()
        except OSError:
            return []
    out: list[Region] = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1].startswith("rw") and parts[1].endswith("p"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def new_regions(before: Iterable[Region], after: Iterable[Region]) -> list[Region]:
    """The address ranges of ``after`` that no region of ``before`` covered: memory mapped since
    (a mapping that grew or merged with an older one contributes only its new part)."""
    old = sorted(before)
    out: list[Region] = []
    for lo, hi in sorted(after):
        cur = lo
        for olo, ohi in old:
            if ohi <= cur or olo >= hi:
                continue
            if olo > cur:
                out.append((cur, olo))
            cur = max(cur, ohi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


def kv_buffer_sizes(lines: Iterable[str]) -> list[int]:
    """Bytes of each KV buffer llama.cpp logged (MiB with two decimals, so +-5 KiB)."""
    return [int(float(m.group(1)) * (1 << 20)) for line in lines if (m := _SIZE_LINE.search(line))]


def _resident(start: int, end: int) -> bytes:
    pages = (end - start) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _c().mincore(ctypes.c_void_p(start), end - start, vec) != 0:
        return bytes(pages)
    return bytes(vec)


def zero_runs(region: Region, min_bytes: int) -> list[Region]:
    """Runs of at least ``min_bytes`` of whole pages in ``region`` that are resident and all zero."""
    import numpy as np

    start, end = region
    resident = np.frombuffer(_resident(start, end), dtype=np.uint8) & 1
    out: list[Region] = []
    for lo, hi in _runs(resident.astype(bool)):
        if (hi - lo) * _PAGE < min_bytes:
            continue
        base = start + lo * _PAGE
        words = np.ctypeslib.as_array((ctypes.c_uint64 * ((hi - lo) * _PAGE // 8)).from_address(base))
        zero = ~words.reshape(hi - lo, _PAGE // 8).any(axis=1)
        for zlo, zhi in _runs(zero):
            if (zhi - zlo) * _PAGE >= min_bytes:
                out.append((base + zlo * _PAGE, base + zhi * _PAGE))
    return out


def _runs(flags: object) -> list[tuple[int, int]]:
    """``[lo, hi)`` index runs where the boolean numpy array ``flags`` is true."""
    import numpy as np

    f = np.concatenate(([False], np.asarray(flags, dtype=bool), [False]))
    edges = np.flatnonzero(f[1:] != f[:-1])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(0, len(edges), 2)]


def match_runs(runs: Sequence[Region], sizes: Sequence[int], page: int = _PAGE) -> list[Region]:
    """The runs whose length is a logged KV buffer size: the buffer shares its first and last page
    with malloc's header and the mapping's untouched tail, so a run is the size less up to two
    pages (plus the log's rounding); each size is matched at most once."""
    left = list(sizes)
    out: list[Region] = []
    slack = 2 * page + 8 * 1024
    for run in runs:
        length = run[1] - run[0]
        for i, size in enumerate(left):
            if size - slack <= length <= size + slack // 2:
                out.append(run)
                del left[i]
                break
    return out


def release(regions: Iterable[Region]) -> int:
    """``madvise(MADV_DONTNEED)`` each region; the bytes released (a failed call counts nothing)."""
    total = 0
    for lo, hi in regions:
        if _c().madvise(ctypes.c_void_p(lo), hi - lo, MADV_DONTNEED) == 0:
            total += hi - lo
    return total


def release_kv_pages(before: Sequence[Region], log_lines: Sequence[str]) -> list[Region]:
    """Find the KV buffers of a context created since ``before`` (the anonymous mappings then)
    from ``log_lines`` (what llama.cpp logged meanwhile) and release their zero pages; returns the
    released regions (``[]`` when nothing matched)."""
    sizes = kv_buffer_sizes(log_lines)
    if not sizes:
        return []
    smallest = max(_PAGE, min(sizes) - 2 * _PAGE - 8 * 1024)
    runs = [run for region in new_regions(before, anon_regions()) for run in zero_runs(region, smallest)]
    found = match_runs(runs, sizes)
    release(found)
    return found
