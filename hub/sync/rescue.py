"""Take over the broker session of a hub worker gone without leaving, handle what it was given, end it.

A worker killed (kill -9, host lost) leaves a persistent session at the broker (``clean_start``
false, expiry ``HUB_SESSION_EXPIRY_S``). Mosquitto keeps giving that offline session its share of
the shared subscriptions (audit batches, events, chunk requests) until the session expires: those
messages wait there, and their senders' re-sends after their ack timeout land there again half
the time. The leader, once the worker's registry row is stale (hub/sync/workers.py), connects
*as that client id* with the same handlers (:class:`~hub.sync.collect.Collector`,
:class:`~hub.sync.blobs.BlobServer`) registered before connecting, so the kept messages are
stored and acknowledged; it leaves the shared subscriptions, waits until they are quiet
(:meth:`fleet.mqtt.MqttClient.leave`) and ends the session (expiry 0): from then on the broker
gives every share to the live workers.

Invariants:
- Nothing is lost: a message of the old session is acknowledged only once handled (the
  subscriptions are ``ack="handled"``), and the session is ended only when it went quiet; what
  the rescue has not handled when it stops stays in the session (still left by every
  subscription) for the worker's return or the next rescue.
- The rescue never fights the worker: if the worker comes back (same client id) the broker hands
  it the session and disconnects the rescuer, which then stops at once instead of reconnecting
  (:class:`Outcome` ``taken_back``); the worker's session then still holds what was not handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass, replace
from pathlib import Path

from fleet.errors import MqttError
from fleet.log import get_logger
from fleet.messages import HUB_PRESENCE, Incoming, meta_topic
from fleet.mqtt import Left, MqttClient, MqttConfig
from hub.sync.blobs import BlobIndex, BlobServer
from hub.sync.collect import Collector
from hub.sync.store import HubStore

log = get_logger(__name__)


class Outcome(enum.Enum):
    ENDED = "ended"
    """The session was taken over, drained and ended."""
    TAKEN_BACK = "taken_back"
    """The worker (or another holder of its client id) connected meanwhile: the rescue stopped."""
    INCOMPLETE = "incomplete"
    """Messages kept coming until the timeout: the session is kept (left by every subscription)
    for the next rescue."""
    UNREACHABLE = "unreachable"
    """No connection to the broker within the timeout: the session is left as it was."""


@dataclass(frozen=True, slots=True)
class Rescue:
    outcome: Outcome
    handled: int
    """Messages handled from the taken-over session (every one its client received)."""


async def _ignore(_msg: Incoming) -> None:
    return None


async def take_over(
    mqtt: MqttConfig,
    client_id: str,
    store: HubStore,
    repo: Path,
    *,
    quiet_s: float = 0.5,
    timeout: float = 30.0,
) -> Rescue:
    """Resume ``client_id``'s session with this worker's credentials and handlers, drain it, end it."""
    client = MqttClient(replace(mqtt, client_id=client_id, will=None))
    collector = Collector(client, store)
    blobs = BlobServer(client, BlobIndex(repo / "targets"))
    await blobs.start()
    await collector.start()
    # the worker's plain subscription to the hub's presence (its own leader logic, not the rescue's)
    await client.subscribe(meta_topic(HUB_PRESENCE), _ignore, qos=1)
    lost: asyncio.Task[None] | None = None
    leaving: asyncio.Task[Left] | None = None
    end = False
    try:
        await client.start()
        try:
            await client.wait_connected(timeout)
        except MqttError:
            return Rescue(Outcome.UNREACHABLE, 0)
        lost = asyncio.create_task(client.wait_disconnected())
        leaving = asyncio.create_task(client.leave(quiet_s=quiet_s, timeout=timeout))
        await asyncio.wait({lost, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not leaving.done():
            return Rescue(Outcome.TAKEN_BACK, client.dispatched)
        left = leaving.result()
        end = left.complete and client.is_connected
        # the session's kept messages arrive right after CONNACK, before leave() starts counting
        return Rescue(Outcome.ENDED if end else Outcome.INCOMPLETE, client.dispatched)
    finally:
        for task in (lost, leaving):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await client.close(end_session=end)
        await collector.close()
        blobs.close()


__all__ = ["Outcome", "Rescue", "take_over"]
