"""A small client of the local API over the Unix socket, for the CLI (httpx + SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from agent.errors import ClientError


class LocalClient:
    """Talks to the daemon at ``socket_path``. Errors become :class:`ClientError` with the API message."""

    def __init__(self, socket_path: Path, timeout: float = 300.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, exc: Exception) -> ClientError:
        if isinstance(exc, httpx.ConnectError | FileNotFoundError):
            return ClientError(f"cannot connect to {self.socket_path}: is `edge-agent run` running? ({exc})")
        return ClientError(f"request to {self.socket_path} failed: {exc}")

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        raise ClientError(f"HTTP {response.status_code}: {_message(response)}")

    def get(self, path: str) -> Any:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self._raise_for(response)
        return response.json()

    def stream_completion(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk of ``POST /v1/completions`` with ``stream: true``."""
        return self.stream("/v1/completions", body)

    def stream_chat(
        self, body: dict[str, Any], *, wait_s: float = 0.0, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk of ``POST /v1/chat/completions`` with ``stream: true``."""
        return self.stream("/v1/chat/completions", body, wait_s=wait_s, on_wait=on_wait)

    def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        wait_s: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk of ``POST path`` with ``stream: true``.

        A ``503`` with ``Retry-After`` (a model still loading) is retried for up to ``wait_s``
        seconds, ``on_wait`` told the daemon's message each time; other errors raise
        :class:`ClientError` with the API's message.
        """
        deadline = time.monotonic() + wait_s
        try:
            while True:
                with self._client.stream("POST", path, json={**body, "stream": True}) as response:
                    retry = response.headers.get("retry-after")
                    if response.status_code == 503 and retry and time.monotonic() < deadline:
                        response.read()
                        if on_wait is not None:
                            on_wait(_message(response))
                        time.sleep(min(float(retry), max(0.1, deadline - time.monotonic())))
                        continue
                    yield from self._events(response)
                    return
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None

    def _events(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        if response.status_code >= 400:
            response.read()
            self._raise_for(response)
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ClientError(chunk["error"].get("message", "stream failed"))
            yield chunk


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


__all__ = ["LocalClient"]
