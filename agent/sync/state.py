"""Reported state: what the device tells the hub about itself (``devices/<id>/state``).

Never retained (devices publish no retained message; the broker refuses them): the state is sent
after every connect (:meth:`StatePublisher.forget`) and whenever it changes, and the hub keeps the
last one in its store.

:func:`build_report` is pure (plain values in, a :class:`StateReport` out);
:class:`StatePublisher` publishes a report when it differs from the last one published (ignoring
the timestamp), so an idle device does not chatter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from fleet.errors import MqttError
from fleet.messages import Outgoing, StateReport, device_topic
from fleet.mqtt import MqttClient


def build_report(
    device_id: str,
    *,
    agent_version: str,
    groups: Iterable[str],
    hardware: Mapping[str, Any],
    default_model: str | None,
    loaded_models: Iterable[str],
    installed: Iterable[str],
    policy_version: str | None,
    audit_backlog: int,
    last_sync: float | None,
    at: float,
    failing: Iterable[Mapping[str, Any]] = (),
    events_pending: int = 0,
    events_dropped: int = 0,
    health: Iterable[Mapping[str, Any]] = (),
    serving: Mapping[str, str] | None = None,
) -> StateReport:
    return StateReport(
        device=device_id,
        online=True,
        agent_version=agent_version,
        groups=tuple(groups),
        hardware=dict(hardware),
        selected_model=default_model,
        loaded_models=tuple(sorted(loaded_models)),
        installed=tuple(sorted(installed)),
        policy_version=policy_version,
        audit_backlog=audit_backlog,
        last_sync=last_sync,
        at=at,
        failing=tuple(dict(f) for f in failing),
        events_pending=events_pending,
        events_dropped=events_dropped,
        health=tuple(dict(h) for h in health),
        serving=dict(serving or {}),
    )


class StatePublisher:
    """Publishes the report with QoS 1 (not retained) when its content changed."""

    def __init__(self, client: MqttClient, device_id: str) -> None:
        self.client = client
        self.topic = device_topic(device_id, "state")
        self._last: StateReport | None = None

    def forget(self) -> None:
        """Publish the next report even if unchanged (after a reconnect to a restarted broker)."""
        self._last = None

    async def publish(self, report: StateReport) -> bool:
        if self._last is not None and dataclasses.replace(self._last, at=report.at) == report:
            return False
        try:
            await self.client.publish(Outgoing(self.topic, report.encode(), qos=1))
        except MqttError:
            return False
        self._last = report
        return True


__all__ = ["StatePublisher", "build_report"]
