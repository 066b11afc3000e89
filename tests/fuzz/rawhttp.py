"""Raw HTTP/1.1 over a Unix socket: send exact bytes, parse exact responses (pipelining included).

httpx refuses to send most of what these tests need (bad request lines, huge or non-UTF-8 headers,
several requests in one write), so they speak bytes. The parser understands ``Content-Length`` and
``chunked`` bodies, and responses that end with the connection.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    version: str = "HTTP/1.1"
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Incomplete(Exception):
    """The bytes end before the response does."""


def _parse_one(data: bytes, at_eof: bool) -> tuple[RawResponse, bytes]:
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        raise Incomplete
    head = data[:head_end].decode("latin-1").split("\r\n")
    version, status, *reason = head[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = data[head_end + 4 :]
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(rest) < n:
            raise Incomplete
        body, rest = rest[:n], rest[n:]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body_parts: list[bytes] = []
        while True:
            line_end = rest.find(b"\r\n")
            if line_end < 0:
                raise Incomplete
            size = int(rest[:line_end].split(b";")[0], 16)
            if len(rest) < line_end + 2 + size + 2:
                raise Incomplete
            body_parts.append(rest[line_end + 2 : line_end + 2 + size])
            rest = rest[line_end + 2 + size + 2 :]
            if size == 0:
                break
        body = b"".join(body_parts)
    else:
        if not at_eof:
            raise Incomplete
        body, rest = rest, b""
    return RawResponse(int(status), reason[0] if reason else "", headers, body, version), rest


def parse_responses(data: bytes, at_eof: bool = True) -> list[RawResponse]:
    """Every complete response in ``data``, in order."""
    out: list[RawResponse] = []
    while data:
        try:
            resp, data = _parse_one(data, at_eof)
        except Incomplete:
            break
        out.append(resp)
    return out


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until the server closes (``"closed"``), resets (``"reset"``) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), "timeout"
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "closed"
        chunks.append(chunk)


def read_responses(sock: socket.socket, count: int = 1, timeout: float = 10.0) -> list[RawResponse]:
    """Read from a kept-alive connection until ``count`` complete responses have arrived."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        responses = parse_responses(data, at_eof=False)
        if len(responses) >= count:
            return responses
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return parse_responses(data, at_eof=False)


def exchange(path: Path, raw: bytes, timeout: float = 10.0) -> tuple[list[RawResponse], str]:
    """Send ``raw`` on a fresh connection, read until the server closes; the responses and how it ended."""
    with connect(path, timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        data, ending = read_until_closed(sock, timeout)
    return parse_responses(data), ending


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> bytes:
    """A well-formed request's bytes (``Content-Length`` from ``body`` unless given)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    all_headers = dict(headers or {})
    if body is not None and not any(k.lower() == "content-length" for k in all_headers):
        all_headers["Content-Length"] = str(len(body))
    if body is not None and not any(k.lower() == "content-type" for k in all_headers):
        all_headers["Content-Type"] = "application/json"
    if close:
        all_headers.setdefault("Connection", "close")
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def assert_json_error(resp: RawResponse, status: int | set[int]) -> dict[str, Any]:
    """``resp`` has the expected status and the OpenAI error shape; returns the error object."""
    allowed = {status} if isinstance(status, int) else status
    assert resp.status in allowed, (resp.status, resp.body[:300])
    assert (resp.header("content-type") or "").startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert "Traceback" not in error["message"]
    if resp.status in (429, 503):
        assert int(resp.header("retry-after") or "0") >= 1, resp.headers
    return error  # type: ignore[no-any-return]


def slow_loris(path: Path, give_up_s: float) -> tuple[list[RawResponse], str]:
    """Send request headers one byte every 0.1 s and never finish them; stop sending after
    ``give_up_s`` or when the server closes. Returns what it answered (a 408 is expected) and how
    the connection ended (as :func:`read_until_closed`)."""
    start = time.monotonic()
    with connect(path) as sock:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - start > give_up_s:
                break
        data, ending = read_until_closed(sock, timeout=5)
    return parse_responses(data), ending


__all__ = [
    "slow_loris",
    "RawResponse",
    "assert_json_error",
    "connect",
    "exchange",
    "parse_responses",
    "read_responses",
    "read_until_closed",
    "request",
]
