"""The disk prompt cache's file rules: atomic writes, torn and tampered files, keys, size cap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.engine.prompt_cache import SUFFIX, PromptCache, cache_key, read_header

KEY = cache_key({"model_sha256": "a" * 64, "n_ctx_seq": 4096})
OTHER_MODEL = cache_key({"model_sha256": "b" * 64, "n_ctx_seq": 4096})
OTHER_SETTINGS = cache_key({"model_sha256": "a" * 64, "n_ctx_seq": 2048})
TOKENS = list(range(1, 601))
PAYLOAD = os.urandom(4096)


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[..., PromptCache]]:
    caches: list[PromptCache] = []

    def open_cache(key: bytes = KEY, max_bytes: int = 1 << 30, min_tokens: int = 100) -> PromptCache:
        cache = PromptCache(tmp_path, key, max_bytes=max_bytes, min_tokens=min_tokens)
        caches.append(cache)
        return cache

    yield open_cache
    for c in caches:
        c.close()


def saved(cache: PromptCache, tokens: list[int] = TOKENS, payload: bytes = PAYLOAD) -> Path:
    cache.offer(tokens, len(tokens), payload)
    cache.close()
    files = sorted(cache.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def test_saved_prefix_is_found_and_loaded_after_a_restart(opened: Callable[..., PromptCache]) -> None:
    saved(opened())
    again = opened()
    assert again.best([*TOKENS[:500], 9999, 9998]) is None, "only whole entries: no cut-back"
    found = again.best([*TOKENS, 9999, 9998])
    assert found is not None and found[1] == len(TOKENS)
    assert again.load(found[0]) == PAYLOAD


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-100]), "torn-tail", id="torn-tail"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:30]), "torn-header", id="torn-header"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes() + b"x"), "trailing-bytes", id="trailing-bytes"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
            "payload-bit-flip",
            id="payload-bit-flip",
        ),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:200] + b"\x07\x00\x00\x00" + p.read_bytes()[204:]),
            "token-changed",
            id="token-changed",
        ),
        pytest.param(lambda p: p.write_bytes(b"NOTCACHE" + p.read_bytes()[8:]), "bad-magic", id="bad-magic"),
    ],
)
def test_damaged_file_is_never_loaded_and_is_deleted(
    opened: Callable[..., PromptCache], damage: Callable[[Path], object], why: str
) -> None:
    path = saved(opened())
    damage(path)
    header = read_header(path)  # what the damaged file claims to hold (None: torn)
    again = opened()
    claimed = [*(header.tokens if header else TOKENS), 1]
    found = again.best(claimed)
    if found is not None:  # damage the header check cannot see: the digest check at load does
        assert again.load(found[0]) is None, why
    assert again.best(claimed) is None
    assert not path.exists()
    assert again.rejected == 1


@pytest.mark.parametrize(
    "key",
    [pytest.param(OTHER_MODEL, id="other-model-hash"), pytest.param(OTHER_SETTINGS, id="other-settings")],
)
def test_file_of_another_model_or_settings_is_refused_but_kept(
    opened: Callable[..., PromptCache], key: bytes
) -> None:
    path = saved(opened())
    other = opened(key)
    assert other.best([*TOKENS, 1]) is None
    assert path.exists(), "another model's entry stays until the size cap evicts it"


def test_kill_9_during_a_write_leaves_nothing_loadable(tmp_path: Path) -> None:
    """A real SIGKILL while the writer is between write and rename (fsync held up)."""
    code = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from agent.engine.prompt_cache import PromptCache
real = os.fsync
def stuck(fd):
    print("writing", flush=True)
    time.sleep(60)
os.fsync = stuck
cache = PromptCache(Path({str(tmp_path)!r}), {KEY!r}, max_bytes=1 << 30, min_tokens=10)
cache.offer(list(range(1, 601)), 600, os.urandom(1 << 20))
time.sleep(60)
"""
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "writing"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(10)
    assert [p.suffix for p in tmp_path.iterdir()] == [".tmp"]
    cache = PromptCache(tmp_path, KEY, max_bytes=1 << 30, min_tokens=10)
    try:
        assert cache.best([*TOKENS, 1]) is None
        assert list(tmp_path.iterdir()) == [], "the unfinished write is deleted"
    finally:
        cache.close()


def test_size_cap_evicts_the_least_recently_used(opened: Callable[..., PromptCache]) -> None:
    payload = os.urandom(10_000)
    first = saved(opened(), [1, *range(1000, 1200)], payload)
    os.utime(first, (time.time() - 100, time.time() - 100))
    second = saved(opened(), [2, *range(1000, 1200)], payload)
    os.utime(second, (time.time() - 50, time.time() - 50))
    size = first.stat().st_size
    small = opened(max_bytes=int(size * 2.5))
    found = small.best([1, *range(1000, 1200), 5])
    assert found is not None and small.load(found[0]) == payload  # first is now the most recent
    saved(small, [3, *range(1000, 1200)], payload)
    assert first.exists() and not second.exists()


@pytest.mark.parametrize(
    ("tokens", "want"),
    [
        pytest.param(TOKENS[:50], False, id="shorter-than-min-tokens"),
        pytest.param(TOKENS[:400], True, id="shorter-than-an-entry-is-not-covered-by-it"),
        pytest.param([*TOKENS, *range(5000, 5050)], False, id="adds-too-little"),
        pytest.param(TOKENS, False, id="already-saved"),
        pytest.param([*TOKENS, *range(5000, 5200)], True, id="adds-enough"),
        pytest.param(list(range(7000, 7200)), True, id="new-prefix"),
    ],
)
def test_what_is_worth_saving(opened: Callable[..., PromptCache], tokens: list[int], want: bool) -> None:
    saved(opened())
    assert opened().wants(tokens) is want


def test_header_round_trip(opened: Callable[..., PromptCache]) -> None:
    path = saved(opened())
    entry = read_header(path)
    assert entry is not None
    assert (entry.key, list(entry.tokens), entry.canonical, entry.payload_len) == (
        KEY,
        TOKENS,
        600,
        len(PAYLOAD),
    )


def test_a_save_still_queued_counts_as_held(tmp_path: Path) -> None:
    """A prefix offered but perhaps not yet written is not offered again one token longer (two
    requests after the same system prompt finishing close together save it once)."""
    cache = PromptCache(tmp_path, b"k" * 32, max_bytes=1 << 30, min_tokens=4)
    try:
        tokens = list(range(10))
        assert cache.wants(tokens)
        cache.offer(tokens, len(tokens), b"state")
        assert not cache.wants([*tokens, 99])
        assert cache.wants([*tokens, *range(100, 104)])
    finally:
        cache.close()
    assert len(list(tmp_path.glob("*.kv"))) == 1


def test_saves_wait_for_an_idle_engine(tmp_path: Path) -> None:
    """While the engine has work the writer holds a queued save (its hashing and fsync would
    slow the decode); the next idle moment writes it."""
    cache = PromptCache(tmp_path, b"k" * 32, max_bytes=1 << 30, min_tokens=4)
    try:
        cache.set_busy(True)
        cache.offer(list(range(10)), 10, bytearray(b"state"))
        time.sleep(0.3)
        assert list(tmp_path.glob("*.kv")) == [] and not cache.wants(list(range(11)))
        cache.set_busy(False)
        deadline = time.monotonic() + 10
        while cache.saved == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.saved == 1 and len(list(tmp_path.glob("*.kv"))) == 1
    finally:
        cache.close()
