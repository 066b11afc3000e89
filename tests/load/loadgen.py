"""A load generator for the local API: many concurrent clients over the Unix socket, mixed requests.

Used by the short load tests (tests/load) and the long benchmark (bench/load_bench.py). Each
simulated client is its own connection (its own ``httpx.AsyncClient``), like separate processes on
the box. A request either completes (any status) or is cancelled by the client on purpose (it
closes its connection mid-request or mid-stream); anything else (a connection error, a timeout, a
malformed answer) is a failure.

The only acceptable refusals under load are ``429``/``503`` with ``Retry-After``: :meth:`LoadResult.
failures` lists every other non-200 answer and every transport error.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "The edge box in the warehouse reported",
    "Write one sentence about solar power:",
    "A haiku about routers:",
    "The three most common failures of a field sensor are",
    "Translate to French: the door is open.",
    "Q: What is the capital of Norway?\nA:",
]

KINDS = ("completion", "completion_stream", "chat", "chat_stream", "embeddings", "models")
DEFAULT_MIX: dict[str, int] = {
    "completion": 3,
    "completion_stream": 2,
    "chat": 2,
    "chat_stream": 1,
    "embeddings": 2,
    "models": 1,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: int | None
    """HTTP status, or ``None`` when no response arrived (cancelled or failed)."""
    seconds: float
    cancelled: bool = False
    error: str | None = None
    retry_after: str | None = None
    completion_tokens: int = 0
    """Generated tokens of a 200 generation answer (its usage; streams ask for the usage chunk)."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def refused_properly(self) -> bool:
        return self.status in (429, 503) and self.retry_after is not None and self.retry_after.isdigit()

    @property
    def failed(self) -> bool:
        if self.cancelled:
            return False
        return not (self.ok or self.refused_properly)


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    duration_s: float = 0.0

    def by_status(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for o in self.outcomes:
            counts["cancelled" if o.cancelled else str(o.status) if o.status else "error"] += 1
        return dict(sorted(counts.items()))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    def latencies(self, kind: str | None = None) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.ok and (kind is None or o.kind == kind))

    def percentile(self, q: float, kind: str | None = None) -> float | None:
        values = self.latencies(kind)
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def generated_tokens(self) -> int:
        """Completion tokens of every successful generation request."""
        return sum(o.completion_tokens for o in self.outcomes if o.ok)

    @property
    def completed(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        kinds = sorted({o.kind for o in self.outcomes})
        return {
            "requests": len(self.outcomes),
            "ok": self.completed,
            "by_status": self.by_status(),
            "failures": len(self.failures()),
            "duration_s": round(self.duration_s, 2),
            "throughput_rps": round(self.throughput, 2),
            "p50_s": _r(self.percentile(0.5)),
            "p99_s": _r(self.percentile(0.99)),
            "generated_tokens": self.generated_tokens,
            "generation_tps": round(self.generated_tokens / self.duration_s, 2)
            if self.duration_s > 0
            else 0.0,
            "per_kind": {
                k: {
                    "ok": len(self.latencies(k)),
                    "p50_s": _r(self.percentile(0.5, k)),
                    "p95_s": _r(self.percentile(0.95, k)),
                    "p99_s": _r(self.percentile(0.99, k)),
                }
                for k in kinds
            },
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _body(
    kind: str, rng: random.Random, max_tokens: int, embedding_model: str | None = None
) -> tuple[str, str, dict[str, Any] | None]:
    prompt = rng.choice(PROMPTS)
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(1 << 30)}
    if kind.endswith("stream"):
        sampling.update(stream=True, stream_options={"include_usage": True})
    if kind.startswith("completion"):
        return "POST", "/v1/completions", {"prompt": prompt, **sampling}
    if kind.startswith("chat"):
        messages = [{"role": "user", "content": prompt}]
        return "POST", "/v1/chat/completions", {"messages": messages, **sampling}
    if kind == "embeddings":
        body: dict[str, Any] = {"input": [prompt, rng.choice(PROMPTS)]}
        if embedding_model is not None:
            body["model"] = embedding_model
        return "POST", "/v1/embeddings", body
    return "GET", "/v1/models", None


def _check_payload(kind: str, text: str) -> tuple[str | None, int]:
    """``(a problem with a 200 answer's body or None, completion tokens it reports)``."""
    try:
        if kind.endswith("stream"):
            events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                return "stream did not end with [DONE]", 0
            tokens = 0
            for e in events[:-1]:
                event = json.loads(e)
                if "error" in event:
                    return f"error event in stream: {e[:200]}", 0
                tokens = _completion_tokens(event) or tokens
            return None, tokens
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"unparsable 200 body: {exc}", 0
    expected = {"completion": "choices", "chat": "choices", "embeddings": "data", "models": "data"}[kind]
    if expected not in data:
        return f"200 body without {expected!r}", 0
    return None, _completion_tokens(data)


def _completion_tokens(data: dict[str, Any]) -> int:
    usage = data.get("usage")
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


async def _one(
    client: httpx.AsyncClient,
    kind: str,
    rng: random.Random,
    max_tokens: int,
    cancel_after: float | None,
    embedding_model: str | None = None,
) -> Outcome:
    method, path, body = _body(kind, rng, max_tokens, embedding_model)
    start = time.monotonic()

    async def go() -> Outcome:
        async with client.stream(method, path, json=body) as response:
            chunks = []
            async for piece in response.aiter_text():
                chunks.append(piece)
            text = "".join(chunks)
        seconds = time.monotonic() - start
        if response.status_code != 200:
            return Outcome(
                kind,
                response.status_code,
                seconds,
                retry_after=response.headers.get("retry-after"),
                error=None if _is_json_error(text) else f"non-JSON error body: {text[:200]}",
            )
        error, tokens = _check_payload(kind, text)
        return Outcome(kind, 200, seconds, error=error, completion_tokens=tokens)

    try:
        if cancel_after is None:
            return await go()
        return await asyncio.wait_for(go(), timeout=cancel_after)
    except TimeoutError:
        if cancel_after is not None:
            return Outcome(kind, None, time.monotonic() - start, cancelled=True)
        raise
    except httpx.HTTPError as exc:
        return Outcome(kind, None, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")


def _is_json_error(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _picker(mix: dict[str, int], rng: random.Random) -> Callable[[], str]:
    kinds = [k for k, w in mix.items() if w > 0]
    weights = [mix[k] for k in kinds]
    return lambda: rng.choices(kinds, weights)[0]


async def _client_loop(
    socket_path: Path,
    *,
    seed: int,
    mix: dict[str, int],
    max_tokens: int,
    cancel_probability: float,
    next_ticket: Callable[[], bool],
    outcomes: list[Outcome],
    timeout_s: float,
    embedding_model: str | None,
) -> None:
    rng = random.Random(seed)
    pick = _picker(mix, rng)
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", timeout=timeout_s
    ) as client:
        while next_ticket():
            cancel_after = rng.uniform(0.01, 0.5) if rng.random() < cancel_probability else None
            outcome = await _one(client, pick(), rng, max_tokens, cancel_after, embedding_model)
            outcomes.append(outcome)
            if outcome.status in (429, 503) and outcome.retry_after and outcome.retry_after.isdigit():
                await asyncio.sleep(min(float(outcome.retry_after), 2.0) * rng.uniform(0.2, 0.6))


async def run_load(
    socket_path: Path,
    *,
    clients: int,
    duration_s: float | None = None,
    requests: int | None = None,
    mix: dict[str, int] | None = None,
    max_tokens: int = 8,
    cancel_probability: float = 0.0,
    seed: int = 0,
    timeout_s: float = 120.0,
    embedding_model: str | None = None,
) -> LoadResult:
    """Run ``clients`` concurrent clients until ``duration_s`` passes or ``requests`` have started;
    embedding requests name ``embedding_model`` (else they go to the default model)."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    mix = mix or DEFAULT_MIX
    outcomes: list[Outcome] = []
    start = time.monotonic()
    issued = 0

    def next_ticket() -> bool:
        nonlocal issued
        if duration_s is not None:
            return time.monotonic() - start < duration_s
        issued += 1
        return issued <= (requests or 0)

    await asyncio.gather(
        *(
            _client_loop(
                socket_path,
                seed=seed * 1000 + i,
                mix=mix,
                max_tokens=max_tokens,
                cancel_probability=cancel_probability,
                next_ticket=next_ticket,
                outcomes=outcomes,
                timeout_s=timeout_s,
                embedding_model=embedding_model,
            )
            for i in range(clients)
        )
    )
    return LoadResult(outcomes, time.monotonic() - start)


def available_kinds(spec: dict[str, Any], kinds: Sequence[str] = KINDS) -> dict[str, int]:
    """:data:`DEFAULT_MIX` restricted to the routes the served OpenAPI document lists."""
    paths = spec.get("paths", {})
    route = {"completion": "/v1/completions", "chat": "/v1/chat/completions", "embeddings": "/v1/embeddings",
             "models": "/v1/models"}  # fmt: skip
    return {k: DEFAULT_MIX[k] for k in kinds if route[k.removesuffix("_stream")] in paths}


__all__ = ["DEFAULT_MIX", "KINDS", "LoadResult", "Outcome", "available_kinds", "run_load"]
