"""``python -m tests.sync.ack_member``: one member of a shared subscription in a process of its own
(so a test can SIGKILL it), built on :class:`fleet.mqtt.MqttClient` with the hub's identity.

It subscribes to ``--filter`` with ``--ack`` and prints ``got <payload>`` (one line, flushed) for
every message its handler receives; with ``--hold`` the handler never returns (an
``ack="handled"`` message then stays un-acknowledged to the broker until the process dies). It
prints ``ready`` once subscribed and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from fleet.messages import Incoming
from fleet.mqtt import MqttClient, MqttConfig


async def run(args: argparse.Namespace) -> None:
    certdir = Path(args.certdir)
    config = MqttConfig(
        host="127.0.0.1",
        port=args.port,
        client_id=args.client_id,
        ca_file=certdir / "ca.crt",
        cert_file=certdir / "hub.crt",
        key_file=certdir / "hub.key",
        session_expiry_s=120,
        receive_maximum=args.receive_maximum,
        backoff_min_s=0.1,
        backoff_max_s=1.0,
    )
    client = MqttClient(config)
    never = asyncio.Event()

    async def handler(msg: Incoming) -> None:
        print(f"got {msg.payload.decode()}", flush=True)
        if args.hold:
            await never.wait()

    await client.subscribe(args.filter, handler, qos=1, ack=args.ack)
    await client.start()
    await client.wait_connected(30)
    print("ready", flush=True)
    await never.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.sync.ack_member")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certdir", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--filter", required=True)
    parser.add_argument("--ack", choices=("received", "handled"), required=True)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--receive-maximum", type=int, default=64)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
