"""The device's sync service against attacks and pushes, with its real audit log: a tampered chunk
and stale metadata are refused *and audited*; a pushed policy is applied, audited and reported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.audit import AuditLog
from agent.engine.llama import LlamaEngine
from agent.engine.pool import ModelPool
from agent.policy import accept_policy, default_policy, load_hub_policy, policy_to_dict
from agent.sync.service import SyncOptions, SyncService
from fleet.device_key import DeviceKey
from fleet.messages import Outgoing, device_topic, meta_topic
from fleet.mqtt import MqttClient
from hub.sync.meta import refresh_timestamp
from registry.publish import add_policy
from registry.repository import Repository
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, make_blob, new_repo, publish_model, running_hub, wait_for


def audit_actions(log: AuditLog) -> list[dict[str, object]]:
    return [s.record() for s in log.iter_records()]


def trusted_timestamp_version(state: Path) -> int | None:
    """The version of the timestamp the device's registry trusts (its TUF metadata on disk)."""
    try:
        raw = (state / "registry" / "metadata" / "timestamp.json").read_bytes()
        return int(json.loads(raw)["signed"]["version"])
    except (OSError, ValueError, KeyError):  # not there yet, or being replaced
        return None


async def test_refusals_are_audited_and_a_pushed_policy_is_applied(
    own_broker: Broker, tmp_path: Path
) -> None:
    broker = own_broker  # a fresh broker: no retained metadata left by other tests
    repo = new_repo(tmp_path / "repo")
    manifest = publish_model(repo, make_blob(tmp_path / "m.gguf", 8 << 20), "m")
    state = tmp_path / "dev"
    enrolled_device(state, repo.path, "dev-a")
    key = DeviceKey.generate()
    audit = AuditLog(state / "audit.db", key=key)
    audit.start()
    pool = ModelPool(lambda info: LlamaEngine(info, n_ctx=128, n_threads=1, n_parallel=1))

    def sink(document: bytes, version: int) -> None:
        accept_policy(state, document, version, audit=audit)

    def policy_version() -> str | None:
        stored = load_hub_policy(state)
        return str(stored.policy.version) if stored is not None else None

    sync = SyncService(
        SyncOptions(
            "dev-a",
            broker.client_config("dev-a"),
            chunk_timeout_s=5,
            chunk_window=1,  # one chunk at a time: the forged replies surely overtake some genuine ones
            audit_key_hex=key.public.raw.hex(),
        ),
        state,
        pool,
        audit=audit,
        policy_sink=sink,
        policy_version=policy_version,
    )
    rogue = MqttClient(broker.client_config("hub", client_id="rogue-svc"))
    await rogue.start()
    await rogue.wait_connected(10)

    async def inject() -> None:  # bad bytes for every chunk, answering requests nobody made
        while True:
            for i in range(8):
                await rogue.publish(
                    Outgoing(
                        device_topic("dev-a", "blobs"),
                        b"\xff" * (1 << 20),
                        correlation=f"{manifest.sha256}:{i}".encode(),
                        user=(("status", "ok"),),
                    )
                )
            await asyncio.sleep(0.01)

    injector = asyncio.create_task(inject())
    try:
        async with running_hub(broker, repo.path) as hub:
            stale = (repo.path / "metadata" / "timestamp.json").read_bytes()
            await sync.start()
            await wait_for(lambda: sync.rounds >= 1 and sync.last_sync is not None, 60, "the first sync")
            injector.cancel()
            assert (state / "registry" / "blobs" / "sha256" / manifest.sha256).is_file()
            # The service submits its refusals to the audit writer thread without waiting for them.
            await wait_for(
                lambda: any(
                    r["action"] == "sync.refused" and r["reason"] == "chunk_hash_mismatch"
                    for r in audit_actions(audit)
                ),
                10,
                "the audited chunk_hash_mismatch",
            )

            # A newer timestamp is trusted; then a rogue re-publishes the stale one.
            synced = sync.last_sync
            fresh = refresh_timestamp(repo.path)
            await hub.meta.sync()
            await wait_for(  # a round that started is not yet one that trusts the new timestamp
                lambda: sync.last_sync != synced and trusted_timestamp_version(state) == fresh,
                30,
                "a refresh on the new timestamp",
            )
            await rogue.publish(Outgoing(meta_topic("timestamp.json"), stale, retain=True))
            await wait_for(
                lambda: any(e.status == "metadata_refused" for e in sync.events_sent), 30, "the refusal event"
            )
            await wait_for(
                lambda: any(
                    r["action"] == "sync.refused" and r["reason"] == "rollback" for r in audit_actions(audit)
                ),
                10,
                "the audited rollback",
            )
            await hub.meta.sync(force=True)

            # A policy pushed by the hub is applied, audited and reported.
            policy = policy_to_dict(default_policy(0, "root", "edge"))
            policy["version"] = 7
            doc = tmp_path / "fleet.json"
            doc.write_text(json.dumps(policy))
            add_policy(Repository.open(repo.path), doc, "fleet", ("edge",))  # as `edge-hub policy push` does
            await hub.meta.sync()
            await wait_for(
                lambda: any(e.status == "policy_applied" for e in sync.events_sent),
                30,
                f"policy {sync.events_sent}",
            )
            assert policy_version() == "7"
            assert any(r["action"] == "policy.change" and r["outcome"] == "ok" for r in audit_actions(audit))
    finally:
        injector.cancel()
        await sync.close()
        await rogue.close()
        await pool.close()
        audit.close()
