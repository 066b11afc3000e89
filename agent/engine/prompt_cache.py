"""Prompt cache on disk: KV cells of long prompts kept across daemon restarts.

A file holds one sequence's llama.cpp state (``llama_state_seq_get_data``) for a list of tokens,
so that after a restart a prompt sharing a long prefix with it loads those cells instead of
decoding them again. Layout (little-endian)::

    magic "EAPCACHE" | version u32 | key 32 B | n_tokens u32 | canonical u32 | payload_len u64
    | digest 32 B | tokens (n_tokens x i32) | payload

``key`` is the sha256 of what makes cells computed elsewhere valid here (:func:`cache_key`: the
model file's sha256, the context settings that shape the KV cells, the mode, the llama.cpp
build); ``digest`` is the sha256 of the tokens and the payload.

Invariants:

* A file is written to a temporary name, fsynced, renamed into place and the directory fsynced:
  a reader sees a whole file or none (a ``kill -9`` mid-write leaves only a ``.tmp`` file, deleted
  at the next start).
* A file is loaded only if its magic, version, key, lengths and digest all match; a torn or
  tampered file (wrong size, wrong digest) is deleted, never loaded. A file of another key (other
  model or settings) is never loaded; it stays until the size cap evicts it.
* The directory stays under ``max_bytes``: least recently used files (by mtime, which a load
  refreshes) are deleted first.
* Only the decode thread calls :meth:`PromptCache.best`, :meth:`PromptCache.load`,
  :meth:`PromptCache.offer` and :meth:`PromptCache.set_busy`; the files are written by one writer
  thread of this object.
* The writer writes while the engine is idle (:meth:`PromptCache.set_busy`): hashing and writing
  ~10 MiB beside a decode on two cores delays the very request whose admission saved the prefix
  (measured: second-request TTFT 110 ms instead of 55 ms). A save waits at most
  ``MAX_DEFER_S`` for an idle moment, then is written anyway; a save still queued counts as held
  (:meth:`PromptCache.wants`), so the same prefix is not offered twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.log import get_logger

log = get_logger(__name__)

__all__ = ["FORMAT_VERSION", "MAGIC", "CacheEntry", "PromptCache", "cache_key", "read_header"]

MAGIC = b"EAPCACHE"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sI32sIIQ32s")
SUFFIX = ".kv"
MAX_PENDING_WRITES = 2
"""Saves queued for the writer beyond which a new one is skipped (each holds its state in memory)."""
MAX_DEFER_S = 30.0
"""How long a queued save waits for the engine to be idle before it is written beside the work."""


def cache_key(fields: Mapping[str, Any]) -> bytes:
    """The 32-byte key of a model + settings combination (sha256 of canonical JSON)."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    key: bytes
    tokens: tuple[int, ...]
    canonical: int
    """Leading tokens computed in whole prompt chunks (batch-invariant reuse stays within them)."""
    payload_len: int
    digest: bytes
    offset: int
    """Where the payload starts in the file."""


def _digest(tokens: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256(tokens)
    h.update(payload)
    return h.digest()


def read_header(path: Path) -> CacheEntry | None:
    """The header and tokens of a cache file, or ``None`` if it is not a whole file of this format
    (wrong magic or version, or a size that does not match the header: torn)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD.size)
            if len(head) != _HEAD.size:
                return None
            magic, version, key, n_tokens, canonical, payload_len, digest = _HEAD.unpack(head)
            if magic != MAGIC or version != FORMAT_VERSION or canonical > n_tokens:
                return None
            raw = fh.read(4 * n_tokens)
            if len(raw) != 4 * n_tokens:
                return None
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    offset = _HEAD.size + 4 * n_tokens
    if size != offset + payload_len:
        return None
    tokens = struct.unpack(f"<{n_tokens}i", raw)
    return CacheEntry(path, key, tokens, canonical, payload_len, digest, offset)


class PromptCache:
    """The prompt cache of one loaded model (see module docstring).

    ``min_tokens``: a finished sequence is saved only if it adds at least that many tokens of
    reusable prefix to what the cache already holds (so a system prompt is saved once, not once
    per question asked after it).
    """

    def __init__(self, directory: Path, key: bytes, *, max_bytes: int, min_tokens: int) -> None:
        self.directory = directory
        self.key = key
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self._lock = threading.Lock()
        self._entries: dict[Path, CacheEntry] = {}
        self._queue: queue.Queue[tuple[tuple[int, ...], int, bytes | bytearray] | None] = queue.Queue()
        self._pending: list[tuple[int, ...]] = []  # queued, not yet written: count as held
        self._idle = threading.Event()
        self._idle.set()
        self.saved = 0
        self.loaded = 0
        self.rejected = 0
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-writer", daemon=True)
        self._writer.start()

    @property
    def entries(self) -> int:
        """Files of this key indexed."""
        with self._lock:
            return len(self._entries)

    # -- decode thread ------------------------------------------------------------------------

    def best(self, prompt: Sequence[int]) -> tuple[CacheEntry, int] | None:
        """The longest entry whose tokens are a prefix of ``prompt`` (leaving at least one prompt
        token to decode), and its length. Only whole entries: a sequence's saved state holds just
        the last window of a sliding-window layer's cells, so it cannot be cut back."""
        with self._lock:
            entries = list(self._entries.values())
        found: tuple[CacheEntry, int] | None = None
        for e in entries:
            n = len(e.tokens)
            if n < len(prompt) and (found is None or n > found[1]) and tuple(prompt[:n]) == e.tokens:
                found = (e, n)
        return found

    def load(self, entry: CacheEntry) -> bytes | None:
        """The entry's state, checked against its digest; ``None`` (and the file deleted) if the
        file changed, was torn or was tampered with since it was indexed."""
        try:
            with entry.path.open("rb") as fh:
                fh.seek(_HEAD.size)
                tokens = fh.read(4 * len(entry.tokens))
                payload = fh.read(entry.payload_len + 1)
        except OSError:
            payload, tokens = b"", b""
        again = read_header(entry.path)
        if (
            again is None
            or again.key != self.key
            or again.tokens != entry.tokens
            or len(payload) != entry.payload_len
            or _digest(tokens, payload) != entry.digest
        ):
            self._reject(entry.path, "digest or size does not match")
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path)  # least recently used goes first
        self.loaded += 1
        return payload

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether saving ``tokens`` adds at least ``min_tokens`` to the longest saved entry that
        is a prefix of them."""
        with self._lock:
            pending = list(self._pending)
        if len(tokens) < self.min_tokens or len(pending) >= MAX_PENDING_WRITES:
            return False
        found = self.best([*tokens, -1])
        held = found[1] if found else 0
        for queued in pending:  # a save still being written holds its prefix already
            n = len(queued)
            if n > held and n <= len(tokens) and tuple(tokens[:n]) == queued:
                held = n
        return len(tokens) - held >= self.min_tokens

    def set_busy(self, busy: bool) -> None:
        """The engine has work (``True``) or waits for some (``False``): queued saves are written
        in the idle moments."""
        if busy:
            self._idle.clear()
        else:
            self._idle.set()

    def offer(self, tokens: Sequence[int], canonical: int, payload: bytes | bytearray) -> None:
        """Queue a save (the writer thread writes it at the next idle moment)."""
        item = tuple(tokens)
        with self._lock:
            self._pending.append(item)
        self._queue.put((item, canonical, payload))

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued writes and stop the writer."""
        self._idle.set()
        self._queue.put(None)
        self._writer.join(timeout)

    # -- writer thread -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # yield the cores to the decode threads
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._idle.wait(MAX_DEFER_S)
            try:
                self._write(*item)
            except OSError as exc:
                log.warning("prompt_cache_write_failed", error=str(exc))
            finally:
                with self._lock:
                    self._pending.remove(item[0])

    def _write(self, tokens: tuple[int, ...], canonical: int, payload: bytes | bytearray) -> None:
        raw = struct.pack(f"<{len(tokens)}i", *tokens)
        digest = _digest(raw, payload)
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, self.key, len(tokens), canonical, len(payload), digest)
        name = hashlib.sha256(self.key + raw).hexdigest()[:32] + SUFFIX
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(head)
                fh.write(raw)
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        entry = CacheEntry(path, self.key, tokens, canonical, len(payload), digest, _HEAD.size + len(raw))
        with self._lock:
            self._entries[path] = entry
        self.saved += 1
        log.info("prompt_cache_saved", tokens=len(tokens), bytes=path.stat().st_size)
        self._enforce_cap()

    # -- any thread ------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index this key's whole files; delete torn ones and leftover temporaries."""
        for path in sorted(self.directory.iterdir()):
            if path.suffix == ".tmp":
                self._reject(path, "unfinished write")
                continue
            if path.suffix != SUFFIX:
                continue
            entry = read_header(path)
            if entry is None:
                self._reject(path, "torn or not a prompt cache file")
            elif entry.key == self.key:
                self._entries[path] = entry
        self._enforce_cap()

    def _reject(self, path: Path, why: str) -> None:
        log.warning("prompt_cache_rejected", file=path.name, reason=why)
        self.rejected += 1
        with self._lock:
            self._entries.pop(path, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def _enforce_cap(self) -> None:
        files: list[tuple[float, int, Path]] = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            with self._lock:
                self._entries.pop(path, None)
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size
