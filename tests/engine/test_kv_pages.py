"""agent.engine.kv_pages: finding a new context's KV buffers and giving their zero pages back.

Pure parts as tables; the release itself on real anonymous memory of this process (glibc's
``malloc`` of a large block is an anonymous mapping, like llama.cpp's KV buffer)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

import numpy  # noqa: F401  (imported before measuring RSS: kv_pages uses it)
import psutil
import pytest

from agent.engine import kv_pages

MIB = 1 << 20
PAGE = 4096

MAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
7f0001000000-7f0001001000 ---p 00000000 00:00 0
7f0002000000-7f0002800000 r--p 00000000 08:01 1234                       /models/gemma.gguf
7f0003000000-7f0003400000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
7f0004000000-7f0004100000 rw-p 00000000 00:00 0
"""


def test_anon_regions_are_private_writable_unnamed_mappings() -> None:
    assert kv_pages.anon_regions(MAPS) == [(0x7F0000000000, 0x7F0001000000), (0x7F0004000000, 0x7F0004100000)]


@pytest.mark.parametrize(
    ("before", "after", "new"),
    [
        pytest.param([(0, 10)], [(0, 10), (20, 30)], [(20, 30)], id="a-new-mapping"),
        pytest.param([(0, 10)], [(0, 40)], [(10, 40)], id="grown-only-the-new-part"),
        pytest.param([(10, 20)], [(0, 40)], [(0, 10), (20, 40)], id="merged-around-an-old-one"),
        pytest.param([(0, 10), (30, 40)], [(0, 40)], [(10, 30)], id="merged-between-two-old-ones"),
        pytest.param([(0, 10), (20, 30)], [(0, 10)], [], id="unmapped"),
    ],
)
def test_new_regions(
    before: list[kv_pages.Region], after: list[kv_pages.Region], new: list[kv_pages.Region]
) -> None:
    assert kv_pages.new_regions(before, after) == new


@pytest.mark.parametrize(
    ("lines", "sizes"),
    [
        pytest.param(
            [
                "llama_kv_cache:        CPU KV buffer size =    96.00 MiB\n",
                "llama_kv_cache:        CPU KV buffer size =   480.00 MiB\n",
            ],
            [96 * MIB, 480 * MIB],
            id="gemma-3-two-caches",
        ),
        pytest.param(
            ["llama_kv_cache:        CPU KV buffer size =    73.50 MiB"], [int(73.5 * MIB)], id="fraction"
        ),
        pytest.param(
            ["llama_context:        CPU  output buffer size =     8.00 MiB"], [], id="output-buffer-is-not-kv"
        ),
        pytest.param(
            ["sched_reserve:        CPU compute buffer size =   514.50 MiB"],
            [],
            id="compute-buffer-is-not-kv",
        ),
    ],
)
def test_kv_buffer_sizes_from_llama_cpp_log(lines: list[str], sizes: list[int]) -> None:
    assert kv_pages.kv_buffer_sizes(lines) == sizes


@pytest.mark.parametrize(
    ("runs", "sizes", "matched"),
    [
        pytest.param([(0, 96 * MIB - PAGE)], [96 * MIB], [(0, 96 * MIB - PAGE)], id="less-the-header-page"),
        pytest.param([(0, 96 * MIB - 2 * PAGE)], [96 * MIB], [(0, 96 * MIB - 2 * PAGE)], id="less-two-pages"),
        pytest.param([(0, 90 * MIB)], [96 * MIB], [], id="too-short"),
        pytest.param([(0, 97 * MIB)], [96 * MIB], [], id="too-long"),
        pytest.param(
            [(0, 8 * MIB), (8 * MIB + PAGE, 104 * MIB)],
            [96 * MIB],
            [(8 * MIB + PAGE, 104 * MIB)],
            id="picks-the-size",
        ),
        pytest.param([(0, 10 * MIB), (20 * MIB, 30 * MIB)], [10 * MIB], [(0, 10 * MIB)], id="each-size-once"),
    ],
)
def test_match_runs(runs: list[kv_pages.Region], sizes: list[int], matched: list[kv_pages.Region]) -> None:
    assert kv_pages.match_runs(runs, sizes, page=PAGE) == matched


@pytest.fixture
def block() -> Iterator[tuple[int, int]]:
    """A 48 MiB block from glibc malloc (an anonymous mapping), zeroed so every page is resident."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 48 * MIB
    addr = libc.malloc(size)
    ctypes.memset(addr, 0, size)
    yield addr, size
    libc.free(addr)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps and madvise are Linux's")
@pytest.mark.parametrize(
    ("logged", "written", "released"),
    [
        pytest.param(48.0, None, True, id="zeroed-buffer-released"),
        pytest.param(48.0, 5 * MIB + 123, False, id="a-written-byte-keeps-the-buffer"),
        pytest.param(32.0, None, False, id="size-not-logged-nothing-released"),
    ],
)
def test_release_on_real_memory(
    block: tuple[int, int], logged: float, written: int | None, released: bool
) -> None:
    addr, size = block
    before: list[kv_pages.Region] = []  # every mapping counts as new
    if written is not None:
        ctypes.memset(addr + written, 7, 1)
    rss_before = rss()
    found = kv_pages.release_kv_pages(
        before, [f"llama_kv_cache:        CPU KV buffer size = {logged:8.2f} MiB\n"]
    )
    freed = rss_before - rss()
    if released:
        end = -(-(addr + size) // PAGE) * PAGE  # the last page: the buffer's end and the chunk's zero tail
        assert len(found) == 1 and found[0][0] >= addr and found[0][1] <= end
        assert freed >= 40 * MIB
    else:
        assert found == [] and freed < 8 * MIB
    data = (ctypes.c_ubyte * size).from_address(addr)
    expected = bytearray(size)
    if written is not None:
        expected[written] = 7
    assert bytes(data) == bytes(expected)  # released pages read back as zeros: nothing changed
