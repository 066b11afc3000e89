"""`edge-hub devices | audit query | deploy --wait` against a real hub database and broker."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from agent.engine.pool import ModelPool
from agent.sync.service import SyncOptions, SyncService
from fleet.chain import GENESIS, Entry, make_checkpoint, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditBatch, StateReport
from hub.cli import main as hub_main
from hub.sync.serve import HubServer, ServeConfig
from hub.sync.store import HubStore
from tests.sync.broker import REPO, Broker
from tests.sync.helpers import enrolled_device, make_blob, new_repo, publish_model


def _filled_db(path: Path) -> None:
    store = HubStore(path)
    key = DeviceKey.generate()
    rows = seal_all(
        [Entry("request", "m", "allow", "t", {}, {"i": i}) for i in range(5)], 0, GENESIS, time.time()
    )
    store.register_key("dev-a", key.public.raw.hex())
    cp = make_checkpoint(rows[-1].seq, rows[-1].hash, key.key_id, time.time(), key.sign)
    signed = ((cp.seq, cp.body, cp.signature),)
    records = tuple((r.seq, r.body, r.hash) for r in rows)
    store.store_audit("dev-a", AuditBatch("dev-a", records, signed, key.public.raw.hex()))
    store.record_state("dev-a", StateReport("dev-a", True, "0.1.0", ("edge",), {}, "gemma", ("gemma",)))
    store.record_status("dev-a", True)
    store.close()


def test_devices_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _filled_db(tmp_path / "hub.db")
    assert hub_main(["devices", "--json", "--db", str(tmp_path / "hub.db")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["device"] == "dev-a" and rows[0]["online"] is True and rows[0]["audit_seq"] == 5
    assert rows[0]["state"]["selected_model"] == "gemma"
    assert hub_main(["devices", "--db", str(tmp_path / "hub.db")]) == 0
    assert "dev-a" in capsys.readouterr().out


def test_audit_query_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _filled_db(tmp_path / "hub.db")
    assert hub_main(["audit", "query", "--device", "dev-a", "--db", str(tmp_path / "hub.db")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4, 5]
    assert (
        hub_main(
            ["audit", "query", "--device", "dev-a", "--since", "2999-01-01", "--db", str(tmp_path / "hub.db")]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    assert (
        hub_main(["audit", "query", "--device", "dev-a", "--verify", "--db", str(tmp_path / "hub.db")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["devices"], id="devices-without-db"),
        pytest.param(["audit", "query", "--device", "dev-a"], id="audit-without-db"),
    ],
)
def test_missing_database_is_bad_usage(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        hub_main([*argv, "--db", str(tmp_path / "none.db")])
    assert exc.value.code == 2


async def test_deploy_wait_shows_each_devices_outcome(broker: Broker, tmp_path: Path) -> None:
    """The device cannot load the (random-bytes) model: `deploy --wait` reports it and exits 1."""
    repo = new_repo(tmp_path / "repo")
    publish_model(repo, make_blob(tmp_path / "m.gguf", 2 << 20), "m", group=None)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    hub = HubServer(
        ServeConfig(repo.path, tmp_path / "hub.db", broker.client_config("hub", client_id="cli-hub"))
    )
    await hub.start()
    from agent.engine.llama import LlamaEngine

    pool = ModelPool(lambda info: LlamaEngine(info, n_ctx=128, n_threads=1, n_parallel=1))
    sync = SyncService(
        SyncOptions("dev-a", broker.client_config("dev-a"), state_interval_s=0.5), tmp_path / "dev", pool
    )
    try:
        await sync.start()
        await sync.wait_rounds(1, 30)
        store = hub.store
        assert store is not None
        deadline = time.monotonic() + 20
        while not any(r.state is not None for r in store.devices()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        c = broker.certdir
        argv = ["deploy", "--repo", str(repo.path), "--group", "edge", "--model", "m", "--wait", "60"]
        argv += ["--db", str(tmp_path / "hub.db"), "--host", "127.0.0.1", "--port", str(broker.service_port)]
        argv += [
            "--ca",
            str(c / "ca.crt"),
            "--cert",
            str(c / "operator.crt"),
            "--key",
            str(c / "operator.key"),
        ]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub.cli",
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await sync.close()
        await hub.close()
        await pool.close()
    text = out.decode()
    assert proc.returncode == 1, text
    assert "dev-a: load_failed" in text
