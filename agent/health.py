"""Per-model health counters the device reports to the hub (staged rollouts gate on them).

For each (model, version) the daemon served: requests, errors (5xx answers), the outcome of its
activation (load + smoke test), and the last :data:`SAMPLES` time-to-first-token and tokens/s
samples, from which the report gives the p95 TTFT and the median tokens/s.

Invariants (bounded and cheap: one deque append per request):
- at most :data:`MAX_VERSIONS` (model, version) entries are kept, the least recently used dropped
  first, and each keeps at most :data:`SAMPLES` samples per series;
- the report (:meth:`HealthBook.report`) is plain JSON values, sorted, so an unchanged book gives
  an unchanged report (the state publisher sends only changes);
- a request is attributed to the version served *when it ran* (``version_of`` is asked then).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SAMPLES = 256
MAX_VERSIONS = 8
LOCAL = "local"
"""The version of a model the sync service did not install (configured in ``[model]``)."""


@dataclass
class _Entry:
    requests: int = 0
    errors: int = 0
    activation: str = ""
    """``passed`` (loaded, smoke test passed), the failure status (``smoke_test_failed``,
    ``load_failed``, ``model_refused``) or "" (never activated through sync)"""
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


class HealthBook:
    """Thread-safe counters; ``version_of(model)`` names the version being served (None: local)."""

    def __init__(self, version_of: Callable[[str], str | None] = lambda _m: None) -> None:
        self.version_of = version_of
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, model: str, version: str) -> _Entry:
        key = (model, version)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > MAX_VERSIONS:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry

    def observe(
        self,
        model: str,
        *,
        ok: bool,
        ttft_s: float | None = None,
        completion_tokens: int = 0,
        duration_s: float = 0.0,
        version: str | None = None,
    ) -> None:
        """One finished inference request. Tokens/s is over the decode time (after the first
        token when ``ttft_s`` is known)."""
        v = version or self.version_of(model) or LOCAL
        with self._lock:
            e = self._entry(model, v)
            e.requests += 1
            if not ok:
                e.errors += 1
                return
            if ttft_s is not None and ttft_s >= 0:
                e.ttft_s.append(ttft_s)
            decode_s = duration_s - (ttft_s or 0.0)
            if completion_tokens > 1 and decode_s > 0:
                e.tokens_per_s.append(completion_tokens / decode_s)

    def activation(self, model: str, version: str, outcome: str) -> None:
        """The outcome of the last activation (load + smoke test) of (model, version)."""
        with self._lock:
            self._entry(model, version).activation = outcome

    def report(self) -> list[dict[str, Any]]:
        """``[{"model", "version", "requests", "errors", "activation", "ttft_p95_s", "tokens_per_s",
        "samples"}]`` sorted by (model, version)."""
        with self._lock:
            items = [
                (k, e.requests, e.errors, e.activation, list(e.ttft_s), list(e.tokens_per_s))
                for k, e in self._entries.items()
            ]
        out = []
        for (model, version), requests, errors, activation, ttft, tps in sorted(items):
            p95 = percentile(ttft, 0.95)
            med = percentile(tps, 0.5)
            out.append(
                {
                    "model": model,
                    "version": version,
                    "requests": requests,
                    "errors": errors,
                    "activation": activation,
                    "ttft_p95_s": round(p95, 4) if p95 is not None else None,
                    "tokens_per_s": round(med, 2) if med is not None else None,
                    "samples": len(tps),
                }
            )
        return out


__all__ = ["LOCAL", "MAX_VERSIONS", "SAMPLES", "HealthBook", "percentile"]
