"""The raw-broker peer of bench/mirror_bench.py: MQTT request/reply of chunk-sized payloads through
the same Mosquitto, TLS and topics as the hub's chunk serving, with no repository, no disk and no
verification.

Two halves:

- ``python bench/mqtt_blob_peer.py --port P --certdir D``: the responder, a process of its own (as
  a hub worker is), connected as ``hub`` on the service listener; it joins the hub's shared
  subscription to chunk requests and answers each with ``length`` bytes sliced from one buffer
  made at start (status ``ok``, the request's correlation, QoS 1, as hub/sync/blobs.py replies).
  It prints ``ready`` once subscribed and runs until SIGTERM.
- :func:`fetch_all`: N device clients (the device's own :class:`fleet.mqtt.MqttClient`, device
  certificates, device listener) in the calling process, each asking for every chunk of a
  ``size``-byte target with at most ``window`` requests in flight (as the device's fetcher), and
  counting the reply bytes (nothing hashed, nothing written).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER_SHA = "0" * 64
"""the sha256 named in the peer's requests (the responder does not look it up)"""


async def respond(port: int, certdir: Path, max_chunk: int) -> None:
    from fleet.messages import BLOB_REQUESTS, ChunkRequest, Incoming, Outgoing, Status, shared
    from fleet.mqtt import MqttClient, MqttConfig

    buf = os.urandom(max_chunk)
    config = MqttConfig(
        "127.0.0.1", port, "raw-peer", certdir / "ca.crt", certdir / "hub.crt", certdir / "hub.key",
        session_expiry_s=60,
    )  # fmt: skip
    client = MqttClient(config)

    async def on_request(msg: Incoming) -> None:
        req = ChunkRequest.decode(msg.payload)
        assert msg.response_topic is not None
        await client.publish(
            Outgoing(
                msg.response_topic,
                buf[: req.length],
                qos=1,
                correlation=msg.correlation,
                user=(("status", Status.OK.value),),
            )
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await client.start()
    await client.wait_connected(30)
    await client.subscribe(shared(BLOB_REQUESTS), on_request, qos=1)
    print("ready", flush=True)
    await stop.wait()
    await client.close(end_session=True)


async def fetch_all(broker: Any, ids: list[str], size: int, chunk: int, window: int) -> float:
    """Seconds until every device received ``size`` bytes in ``chunk``-byte replies."""
    from fleet.messages import BLOB_REQUESTS, ChunkRequest, Incoming, Outgoing, device_topic
    from fleet.mqtt import MqttClient

    clients = [MqttClient(broker.client_config(d, client_id=d)) for d in ids]
    for c in clients:
        await c.start()
    await asyncio.gather(*(c.wait_connected(30) for c in clients))
    pending: dict[str, dict[bytes, asyncio.Future[int]]] = {d: {} for d in ids}

    def handler(d: str) -> Any:
        def on_reply(msg: Incoming) -> None:
            fut = pending[d].pop(msg.correlation or b"", None)
            if fut is not None and not fut.done():
                fut.set_result(len(msg.payload))

        return on_reply

    for d, c in zip(ids, clients, strict=True):
        await c.subscribe(device_topic(d, "blobs"), handler(d), qos=1)
    n = (size + chunk - 1) // chunk

    async def one(d: str, c: MqttClient) -> int:
        sem = asyncio.Semaphore(window)
        loop = asyncio.get_running_loop()

        async def get(i: int) -> int:
            async with sem:
                req = ChunkRequest(PEER_SHA, i, i * chunk, min(chunk, size - i * chunk))
                fut: asyncio.Future[int] = loop.create_future()
                pending[d][req.correlation] = fut
                await c.publish(
                    Outgoing(
                        BLOB_REQUESTS,
                        req.encode(),
                        qos=1,
                        response_topic=device_topic(d, "blobs"),
                        correlation=req.correlation,
                    ),
                    timeout=120,  # no retry here: the PUBACK may queue behind 4 MiB replies
                )
                return await asyncio.wait_for(fut, 120)

        return sum(await asyncio.gather(*(get(i) for i in range(n))))

    try:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(d, c) for d, c in zip(ids, clients, strict=True)))
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    if any(g != size for g in got):
        raise RuntimeError(f"raw broker peer: received {got[:5]}... of {size}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="the broker's service listener")
    p.add_argument("--certdir", type=Path, required=True, help="ca.crt, hub.crt, hub.key")
    p.add_argument("--max-chunk", type=int, default=4 << 20)
    args = p.parse_args()
    from fleet import log as fleet_log

    fleet_log.configure("warning", "console", stream=sys.stderr)
    asyncio.run(respond(args.port, args.certdir, args.max_chunk))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
