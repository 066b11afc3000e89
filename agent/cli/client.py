"""A small client of the local API over the Unix socket, for the CLI (httpx + SSE)."""

from __future__ import annotations

import json
from collections.abc import Iterator
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
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ClientError(f"HTTP {response.status_code}: {message}")

    def get(self, path: str) -> Any:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None
        self._raise_for(response)
        return response.json()

    def stream_completion(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk of ``POST /v1/completions`` with ``stream: true``."""
        try:
            with self._client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
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
        except httpx.HTTPError as exc:
            raise self._fail(exc) from None


__all__ = ["LocalClient"]
