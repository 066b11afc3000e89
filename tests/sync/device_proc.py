"""A device that refreshes its registry over MQTT once, in its own process (for SIGKILL tests).

    python -m tests.sync.device_proc STATE_DIR PORT CERTDIR DEVICE_ID [WINDOW [MIRROR_URL [RATE]]]

MIRROR_URL (or ``-``) is an HTTP mirror asked before MQTT; RATE a download limit in bytes/s.

Prints one JSON line with the transfer statistics when the update completed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.sync.fetcher import MqttFetcher, RetainedMetadata, attach, trusted_plans
from agent.sync.gate import TransferGate
from fleet.mqtt import MqttClient, MqttConfig
from registry.device import DeviceRegistry


async def main(
    state_dir: Path, port: int, certdir: Path, device_id: str, window: int, mirror: str, rate: int
) -> int:
    from fleet import log

    log.configure("warning", "json", stream=sys.stderr)  # stdout carries only "ready" and the result
    client = MqttClient(
        MqttConfig(
            "127.0.0.1",
            port,
            device_id,
            certdir / "ca.crt",
            certdir / f"{device_id}.crt",
            certdir / f"{device_id}.key",
            backoff_min_s=0.1,
            backoff_max_s=1.0,
        )
    )
    await client.start()
    await client.wait_connected(20)
    metadata = RetainedMetadata(client, wait_s=10)
    await metadata.start()
    print("ready", flush=True)  # the transfer starts now (the SIGKILL test aims after this line)
    registry = DeviceRegistry(state_dir)
    fetcher = MqttFetcher(
        asyncio.get_running_loop(),
        client,
        device_id,
        metadata,
        trusted_plans(registry.metadata_dir),
        state_dir / "sync" / "partial",
        window=window,
        chunk_timeout_s=5,
        mirrors=(mirror,) if mirror != "-" else (),
        gate=TransferGate(rate or None),
    )
    attach(registry, fetcher)
    result = await asyncio.to_thread(registry.update, fetcher)
    await client.close()
    stats = [
        {
            "resumed": t.resumed_chunks,
            "requested": sum(t.requested.values()),
            "refused": t.refused_chunks,
            "mirror_chunks": t.mirror_chunks,
        }
        for t in fetcher.transfers
    ]
    print(
        json.dumps({"installed": list(result.installed), "already": list(result.already), "transfers": stats})
    )
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    window = int(a[4]) if len(a) > 4 else 2
    mirror = a[5] if len(a) > 5 else "-"
    rate = int(a[6]) if len(a) > 6 else 0
    raise SystemExit(asyncio.run(main(Path(a[0]), int(a[1]), Path(a[2]), a[3], window, mirror, rate)))
