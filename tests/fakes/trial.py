"""A fake crash-isolation trial (the :class:`agent.engine.isolation.TrialRunner` seam).

It returns the outcome programmed for a model id (``ok`` by default) and counts its calls, so a
test of :class:`agent.engine.isolation.Isolation` states what each child "did" without a process.
"""

from __future__ import annotations

from collections import Counter

from agent.engine.base import ModelInfo
from agent.engine.isolation import TrialOutcome

OK = TrialOutcome(True, "ok", "fake trial passed")


class FakeTrial:
    def __init__(self, outcomes: dict[str, TrialOutcome] | None = None) -> None:
        self.outcomes = dict(outcomes or {})
        self.calls: Counter[str] = Counter()

    async def __call__(self, info: ModelInfo, timeout_s: float) -> TrialOutcome:
        self.calls[info.id] += 1
        return self.outcomes.get(info.id, OK)
