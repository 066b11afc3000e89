"""Staged rollouts end to end: a real Mosquitto, ``edge-hub serve`` in process with its rollout
controller, and boxes running the real sync service (real signed metadata, real transfers, the
wave selector resolved by the real registry) with fake engines. Health numbers are what each box's
daemon would feed its health book; here the test feeds them, and they travel in the real state
reports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.engine.base import ModelInfo
from agent.engine.pool import ModelPool
from agent.sync.service import SyncOptions, SyncService
from hub.rollout.criteria import box_order
from hub.rollout.store import RolloutStore
from hub.sync.serve import HubServer, ServeConfig
from registry.publish import set_deployment
from tests.fakes.engine import FakeBehaviour, FakeEngine
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, make_blob, new_repo, publish_model, wait_for

BOXES = ("dev-a", "dev-b", "dev-c")
FAST = {
    "max_slowdown": 0.2,
    "min_samples": 5.0,
    "min_requests": 5.0,
    "soak_s": 3600.0,
    "wave_timeout_s": 3600.0,
}


class ByBlob:
    """Fake engines whose behaviour depends on the blob (so v2 can fail while v1 works)."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad

    def __call__(self, info: ModelInfo) -> FakeEngine:
        broken = info.path.name in self.bad
        return FakeEngine(info, FakeBehaviour(finish_reason="error") if broken else FakeBehaviour())


@dataclass
class Fleet:
    repo: Path
    hub: HubServer
    boxes: dict[str, SyncService]
    v2_sha: str


@contextlib.asynccontextmanager
async def fleet(
    broker: Broker, tmp: Path, *, smoke_fails: bool, online: tuple[str, ...] = BOXES
) -> AsyncIterator[Fleet]:
    repo = new_repo(tmp / "repo")
    publish_model(repo, make_blob(tmp / "v1.bin", 300_000, 1), "m", "1", group=None, name="model.gguf")
    v2 = publish_model(repo, make_blob(tmp / "v2.bin", 300_000, 2), "m", "2", group=None, name="model.gguf")
    set_deployment(repo, "edge", "m", version="1", pin=True)
    hub = HubServer(
        ServeConfig(
            repo.path, tmp / "hub.db", broker.client_config("hub"), meta_poll_s=0.3, rollout_interval_s=0.3
        )
    )
    await hub.start()
    boxes: dict[str, SyncService] = {}
    try:
        for dev in online:
            enrolled_device(tmp / dev, repo.path, dev)
            pool = ModelPool(ByBlob({v2.sha256} if smoke_fails else set()), smoke_timeout_s=5.0, settle_s=0.0)
            options = SyncOptions(
                dev, broker.client_config(dev), refresh_interval_s=1.0, state_interval_s=0.3
            )
            boxes[dev] = SyncService(options, tmp / dev, pool)
            # the previous version's numbers, as the daemon measured them
            for _ in range(10):
                boxes[dev].health.observe(
                    "m", ok=True, ttft_s=0.1, completion_tokens=21, duration_s=1.1, version="1"
                )
            await boxes[dev].start()
        assert hub.store is not None
        for dev in online:
            await wait_for(lambda d=dev: boxes[d].serving_versions.get("m") == "1", 60, f"{dev} on v1")
        await wait_for(
            lambda: (
                sum(r.state is not None and r.state.serving.get("m") == "1" for r in hub.store.devices())
                == len(online)
            ),  # type: ignore[union-attr]
            60,
            "the hub knows every box on v1",
        )
        f = Fleet(repo.path, hub, boxes, v2.sha256)
        yield f
        hub = f.hub  # a test may have restarted it
    finally:
        for s in boxes.values():
            await s.close()
        await hub.close()


def start(f: Fleet, waves: list[int], devices: tuple[str, ...] = BOXES, **criteria: float) -> int:
    assert f.hub.store is not None
    store = RolloutStore(f.hub.store)
    order = box_order(devices, "t")
    r = store.create("edge", "m", "2", "1", waves, {**FAST, **criteria}, order)
    return r.id


def state_of(f: Fleet, rid: int) -> str:
    assert f.hub.store is not None
    r = RolloutStore(f.hub.store).get(rid)
    assert r is not None
    return r.state


def decisions(f: Fleet, rid: int) -> list[str]:
    assert f.hub.store is not None
    return [d for _, d, _ in RolloutStore(f.hub.store).history(rid)]


def feed_v2(f: Fleet, tokens_per_s: float) -> None:
    """What the daemons would measure on v2: 10 requests at ``tokens_per_s``."""
    for box in f.boxes.values():
        for _ in range(10):
            box.health.observe(
                "m",
                ok=True,
                ttft_s=0.1,
                completion_tokens=21,
                duration_s=0.1 + 20 / tokens_per_s,
                version="2",
            )


@pytest.mark.parametrize(
    ("case", "smoke_fails", "v2_speed", "final", "wanted"),
    [
        pytest.param(
            "healthy",
            False,
            20.0,
            "completed",
            ["started", "wave_advanced", "completed"],
            id="healthy-waves-complete",
        ),
        pytest.param(
            "smoke",
            True,
            20.0,
            "rolled_back",
            ["started", "aborted", "rolling_back", "rolled_back"],
            id="smoke-fails-first-wave-rolls-back",
        ),
        pytest.param(
            "slow", False, 12.0, "paused", ["started", "paused"], id="40pct-slower-pauses-first-wave"
        ),
    ],
)
async def test_rollout(
    broker: Broker,
    tmp_path: Path,
    case: str,
    smoke_fails: bool,
    v2_speed: float,
    final: str,
    wanted: list[str],
) -> None:
    async with fleet(broker, tmp_path, smoke_fails=smoke_fails) as f:
        feed_v2(f, v2_speed)
        rid = start(f, [1, 3])
        await wait_for(lambda: state_of(f, rid) == final, 90, f"rollout {final}")
        assert decisions(f, rid)[: len(wanted)] == wanted, decisions(f, rid)
        first = box_order(BOXES, "t")[0]
        if case == "healthy":
            await wait_for(
                lambda: all(b.serving_versions.get("m") == "2" for b in f.boxes.values()), 60, "all on v2"
            )
        elif case == "smoke":  # the first wave's box failed and never served v2; nobody else got it
            await asyncio.sleep(1.0)
            assert all(b.serving_versions.get("m") == "1" for b in f.boxes.values())
        else:  # paused at wave 1: only its box moved
            assert f.boxes[first].serving_versions.get("m") == "2"
            assert all(b.serving_versions.get("m") == "1" for d, b in f.boxes.items() if d != first)


async def test_abort_mid_wave_rolls_back(broker: Broker, tmp_path: Path) -> None:
    async with fleet(broker, tmp_path, smoke_fails=False) as f:
        rid = start(f, [1, 3])  # no v2 numbers: wave 1 soaks (waits) after moving
        first = box_order(BOXES, "t")[0]
        await wait_for(lambda: f.boxes[first].serving_versions.get("m") == "2", 60, "wave 1 moved")
        assert f.hub.store is not None
        store = RolloutStore(f.hub.store)
        r = store.get(rid)
        assert r is not None
        store.update(rid, state="aborting", reason="operator")  # what `edge-hub rollout abort` writes
        await wait_for(lambda: state_of(f, rid) == "rolled_back", 60, "rolled back")
        assert f.boxes[first].serving_versions.get("m") == "1"


async def test_offline_box_is_skipped_after_timeout(broker: Broker, tmp_path: Path) -> None:
    async with fleet(broker, tmp_path, smoke_fails=False, online=("dev-a", "dev-b")) as f:
        assert f.hub.store is not None
        f.hub.store.record_status("dev-c", False)  # known to the hub, offline during its wave
        feed_v2(f, 20.0)
        rid = start(f, [3], devices=BOXES, wave_timeout_s=2.0)
        await wait_for(lambda: state_of(f, rid) == "completed", 60, "completed without dev-c")


async def test_hub_restart_resumes_from_stored_state(broker: Broker, tmp_path: Path) -> None:
    async with fleet(broker, tmp_path, smoke_fails=False) as f:
        rid = start(f, [1, 3])
        first = box_order(BOXES, "t")[0]
        await wait_for(lambda: f.boxes[first].serving_versions.get("m") == "2", 60, "wave 1 moved")
        await f.hub.close()
        hub = HubServer(
            ServeConfig(
                f.repo,
                tmp_path / "hub.db",
                broker.client_config("hub"),
                meta_poll_s=0.3,
                rollout_interval_s=0.3,
            )
        )
        await hub.start()
        f.hub = hub
        feed_v2(f, 20.0)
        await wait_for(lambda: state_of(f, rid) == "completed", 90, "completed after restart")
        assert decisions(f, rid).count("started") == 1
