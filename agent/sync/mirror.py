"""Untrusted HTTP(S) mirrors of the repository's target files: range reads, nothing trusted.

A mirror is a plain web server (nginx, an object store, a CDN) serving a copy of the hub
repository's ``targets/`` tree, so the file of a target is ``<mirror>/<dir>/<sha256>.<name>``
(consistent-snapshot names, content addressed: a mirror never needs to know what is deployed).
The box lists mirrors in ``[hub] mirrors`` and gets more from the signed deployments of its groups
(``mirrors`` field, docs/protocol.md "Mirrors").

Invariants:
- Nothing read here is trusted: :class:`MirrorReader` only yields ``(index, bytes)`` for the chunk
  ranges it was asked; the transfer checks every chunk against the signed chunk hash before a byte
  is written (:meth:`agent.sync.fetcher.ChunkTransfer.accept`), exactly as for MQTT chunks.
- A response is used only when it is ``206 Partial Content`` whose ``Content-Range`` starts at the
  asked offset (or ``200`` for a range starting at 0, read up to the asked end): a server that
  ignores or misplaces ranges is a bad response, never a source of misaligned bytes.
- Every network step (connect, each read) is bounded by ``timeout_s``; any failure raises
  :class:`MirrorFailed` naming a reason (``unavailable``, ``timeout``, ``bad_response``), so the
  caller skips the mirror and goes on with the next source.
- TLS is verified against the system CA store, or only ``ca_file`` when one is configured.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from urllib.parse import quote

import aiohttp

MIRROR_REASONS = ("unavailable", "timeout", "bad_response", "wrong_bytes")
"""Why a mirror was skipped for a transfer (metric label ``reason``)."""


class MirrorFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def target_url(base: str, target_file: str) -> str:
    """``base`` (a copy of ``targets/``) joined with the target's file path (``dir/<sha>.<name>``),
    each segment percent-encoded."""
    return base.rstrip("/") + "/" + "/".join(quote(part, safe="") for part in target_file.split("/"))


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying context: ``ca_file`` only when given, else the system store."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)


def session(timeout_s: float, ssl_ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    """One session per transfer: keep-alive connections to its mirrors, nothing else kept."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=4)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)


class MirrorReader:
    """Read chunk ranges of one target file from one mirror."""

    def __init__(self, http: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        self.http = http
        self.url = url
        self.timeout_s = timeout_s

    async def span(self, spans: Sequence[tuple[int, int, int]]) -> AsyncGenerator[tuple[int, bytes]]:
        """Yield ``(index, data)`` for consecutive chunks ``spans`` = [(index, offset, length)...]
        (contiguous in the file), from one range request. The caller may stop early (closing the
        generator closes the response)."""
        start = spans[0][1]
        end = spans[-1][1] + spans[-1][2]  # exclusive
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        try:
            async with self.http.get(self.url, headers=headers, allow_redirects=True) as resp:
                _check_response(resp, start, end)
                for index, _offset, length in spans:
                    async with asyncio.timeout(self.timeout_s):
                        data = await resp.content.readexactly(length)
                    yield index, data
        except MirrorFailed:
            raise
        except TimeoutError as exc:
            raise MirrorFailed("timeout", f"{self.url}: no data for {self.timeout_s} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise MirrorFailed("bad_response", f"{self.url}: body ended early") from exc
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise MirrorFailed("unavailable", f"{self.url}: {exc or type(exc).__name__}") from exc


def _check_response(resp: aiohttp.ClientResponse, start: int, end: int) -> None:
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        unit, _, rest = content_range.partition(" ")
        first = rest.partition("-")[0]
        if unit != "bytes" or not first.isdigit() or int(first) != start:
            raise MirrorFailed("bad_response", f"{resp.url}: Content-Range {content_range!r} for {start}-")
        return
    if resp.status == 200 and start == 0:
        return  # the whole file from 0: the asked bytes are its prefix
    raise MirrorFailed("bad_response", f"{resp.url}: HTTP {resp.status} to a range request")


__all__ = ["MIRROR_REASONS", "MirrorFailed", "MirrorReader", "session", "ssl_context", "target_url"]
