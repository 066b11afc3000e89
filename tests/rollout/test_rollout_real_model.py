"""Staged rollouts with real model engines: a real Mosquitto, ``edge-hub serve`` in process with
its rollout controller, two boxes each running the real sync service over a real llama.cpp pool
(the demo Gemma 3 270M, context 256) behind the daemon's own HTTP application on a Unix socket.

The health numbers the rollout criteria judge are not fed by the test: traffic goes through each
box's API (``build_app`` with the box's :class:`~agent.health.HealthBook`, as ``edge-agent run``
wires it), whose health middleware records each request's outcome, time to first token and
tokens/s under the version the box serves at that moment; the sync service reports the book in
its state. The operator drives the rollout with the real CLI (``python -m hub.cli rollout start``
and ``rollout status --json``), as docs/operations.md (4.7) tells them to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, UnixConnector, web

from agent.engine.pool import ModelPool
from agent.health import HealthBook
from agent.server.http import build_app
from agent.sync.service import SyncOptions, SyncService
from hub.rollout.store import RolloutStore
from hub.sync.serve import HubServer, ServeConfig
from registry.publish import set_deployment
from tests.sync.broker import Broker
from tests.sync.helpers import (
    enrolled_device,
    installed_files,
    new_repo,
    publish_model,
    small_llama_pool,
    wait_for,
)
from tests.sync.test_deploy_e2e import make_silent_model

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BOXES = ("dev-a", "dev-b")
MODEL = "gemma"
LIMITS = {"max_body_bytes": 1 << 16, "default_max_tokens": 16, "request_timeout_s": 60}
CRITERIA = [
    # Few samples so the waves pass in seconds. Speed is compared for real, with wide margins: the
    # machine is shared, and speed is not what these cases are about (the fake-engine table
    # tests/rollout/test_rollout_e2e.py has the 40 %-slower case).
    *("--min-samples", "8", "--min-requests", "8", "--max-slowdown", "0.6"),
    *("--max-ttft-increase", "3", "--soak-s", "3600", "--wave-timeout-s", "3600"),
]
REQUEST = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "stream": True}


@dataclass
class Box:
    device: str
    sync: SyncService
    pool: ModelPool
    runner: web.AppRunner
    session: ClientSession
    answers: dict[int, int] = field(default_factory=dict)
    """HTTP status -> count of the traffic's requests"""

    async def infer(self) -> int:
        """One streamed completion through the box's API (read to the end)."""
        async with self.session.post("http://localhost/v1/completions", json=REQUEST) as r:
            await r.read()
            self.answers[r.status] = self.answers.get(r.status, 0) + 1
            return r.status

    def health(self, version: str) -> dict[str, Any]:
        """The box's own health entry for ``version`` of the model ({} when it never served it)."""
        entries = [h for h in self.sync.health.report() if h["model"] == MODEL and h["version"] == version]
        return entries[0] if entries else {}


@dataclass
class Fleet:
    repo: Path
    db: Path
    hub: HubServer
    boxes: dict[str, Box]
    v2_sha: str

    def rollout_state(self) -> str | None:
        assert self.hub.store is not None
        r = RolloutStore(self.hub.store).latest("edge")
        return r.state if r is not None else None


async def serve_api(pool: ModelPool, health: HealthBook, sock: Path) -> tuple[web.AppRunner, ClientSession]:
    """The daemon's HTTP application (its health middleware included) on a Unix socket."""
    runner = web.AppRunner(build_app(pool, LIMITS, health=health), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    return runner, ClientSession(connector=UnixConnector(path=str(sock)))


@contextlib.asynccontextmanager
async def fleet(broker: Broker, tmp: Path, gemma: Path, v2: Callable[[Path], Path]) -> AsyncIterator[Fleet]:
    """Two boxes of group ``edge`` serving ``gemma`` 1 (the real model); ``gemma`` 2 (made by
    ``v2``) published but not deployed."""
    repo = new_repo(tmp / "repo")
    publish_model(repo, gemma, MODEL, "1", chunk_size=4 << 20, group=None, name="model.gguf")
    new = publish_model(repo, v2(tmp), MODEL, "2", chunk_size=4 << 20, group=None, name="model.gguf")
    set_deployment(repo, "edge", MODEL, version="1", pin=True)
    db = tmp / "hub.db"
    config = ServeConfig(repo.path, db, broker.client_config("hub"), meta_poll_s=0.3, rollout_interval_s=0.3)
    hub = HubServer(config)
    await hub.start()
    boxes: dict[str, Box] = {}
    try:
        for dev in BOXES:
            enrolled_device(tmp / dev, repo.path, dev)
            pool = small_llama_pool()
            health = HealthBook()  # as the daemon wires it: fed by the API, reported by sync
            runner, session = await serve_api(pool, health, tmp / f"{dev}.sock")
            options = SyncOptions(
                dev, broker.client_config(dev), refresh_interval_s=1.0, state_interval_s=0.5
            )
            sync = SyncService(options, tmp / dev, pool, health=health)
            boxes[dev] = Box(dev, sync, pool, runner, session)
            await sync.start()
        for box in boxes.values():
            await wait_for(lambda b=box: b.sync.serving_versions.get(MODEL) == "1", 240, f"{box.device} on 1")
        store = hub.store
        assert store is not None
        await wait_for(
            lambda: (
                sum(r.state is not None and r.state.serving.get(MODEL) == "1" for r in store.devices())
                == len(BOXES)
            ),
            60,
            "the hub knows every box on 1",
        )
        yield Fleet(repo.path, db, hub, boxes, new.sha256)
    finally:
        for box in boxes.values():
            await box.sync.close()
            await box.session.close()
            await box.runner.cleanup()
            await box.pool.close()
        await hub.close()


@contextlib.asynccontextmanager
async def traffic(f: Fleet) -> AsyncIterator[None]:
    """The boxes' users: one streamed request to each box in turn, all along."""

    async def run() -> None:
        while True:
            for box in f.boxes.values():
                await box.infer()
            await asyncio.sleep(0.1)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def edge_hub(f: Fleet, *args: str) -> tuple[int, str, str]:
    """``python -m hub.cli ARGS`` as an operator on the hub machine runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_HUB_DB": str(f.db), "EDGE_HUB_REPO": str(f.repo)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub.cli", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status(f: Fleet) -> dict[str, Any]:
    code, out, err = await edge_hub(f, "rollout", "status", "--group", "edge", "--json")
    assert code == 0, err
    view: dict[str, Any] = json.loads(out)
    return view


ROLLED_BACK = ["created", "started", "aborted", "rolling_back", "rolled_back"]


@pytest.mark.parametrize(
    ("case", "final", "decisions"),
    [
        pytest.param(
            "healthy",
            "completed",
            ["created", "started", "wave_advanced", "completed"],
            id="healthy-same-weights-republished-waves-complete",
        ),
        pytest.param("smoke-fails", "rolled_back", ROLLED_BACK, id="smoke-fails-first-wave-rolls-back"),
        pytest.param("abort", "rolled_back", ROLLED_BACK, id="operator-abort-mid-wave-rolls-back"),
    ],
)
async def test_rollout_with_real_engines(
    broker: Broker, tmp_path: Path, gemma_path: Path, case: str, final: str, decisions: list[str]
) -> None:
    def v2(tmp: Path) -> Path:
        if case != "smoke-fails":
            return gemma_path  # the same weights, republished as version 2
        silent = tmp / "silent.gguf"
        make_silent_model(gemma_path, silent)  # loads, but its smoke test produces nothing
        return silent

    async with fleet(broker, tmp_path, gemma_path, v2) as f, traffic(f):
        # The previous version's numbers, measured by the boxes' own APIs, reach the hub first.
        await wait_for(lambda: all(b.health("1").get("samples", 0) >= 8 for b in f.boxes.values()), 120, "v1")
        soak = ["--min-samples", "100000"] if case == "abort" else []  # wave 1 soaks until the abort
        code, out, err = await edge_hub(
            f, "rollout", "start", "--group", "edge", "--model", MODEL, "--version", "2",
            "--waves", "1,all", *CRITERIA, *soak,
        )  # fmt: skip
        assert code == 0, err
        assert "1 -> 2 in 2 waves" in out, out
        if case == "abort":  # the operator sees wave 1 serve the new version, then aborts
            first = (await status(f))["wave_list"][0]["devices"][0]["device"]
            moved = f.boxes[first]
            await wait_for(lambda: moved.health("2").get("samples", 0) >= 2, 120, "wave 1 serving 2")
            code, out, err = await edge_hub(f, "rollout", "abort", "--group", "edge", "--reason", "by hand")
            assert code == 0 and "aborted" in out, (code, out, err)
        try:
            await wait_for(lambda: f.rollout_state() == final, 120, f"rollout {final}")
        finally:
            view = await status(f)
            print(json.dumps(view, indent=1))  # what the operator would see (shown on failure)

    assert [h["decision"] for h in view["history"]] == decisions, view["history"]
    first, second = (w["devices"][0]["device"] for w in view["wave_list"])
    a, b = f.boxes[first], f.boxes[second]
    if case == "healthy":
        for box in (a, b):
            assert box.sync.serving_versions[MODEL] == "2"
            assert box.health("2")["activation"] == "passed"
            assert box.health("2")["errors"] == 0
        assert all(w["moved"] == 1 and w["healthy"] == 1 for w in view["wave_list"]), view["wave_list"]
        # every wave's decision says what it measured, on real numbers from the boxes
        advanced = next(h["detail"] for h in view["history"] if h["decision"] == "wave_advanced")
        assert "tokens/s" in advanced and "not enough samples" not in advanced, advanced
        assert view["baseline"]["samples"] >= 8, view["baseline"]
    elif case == "abort":
        assert a.health("2")["activation"] == "passed" and a.health("2")["requests"] > 0, a.health("2")
        assert a.sync.serving_versions[MODEL] == "1"  # switched back to the previous version
        assert b.health("2") == {}  # the later wave's box never served version 2
        assert b.sync.serving_versions[MODEL] == "1"
        aborted = next(h["detail"] for h in view["history"] if h["decision"] == "aborted")
        assert aborted == "by the operator: by hand", aborted
    else:
        assert a.health("2")["activation"] == "smoke_test_failed", a.health("2")
        assert a.sync.serving_versions[MODEL] == "1"
        assert b.health("2") == {}  # the later wave's box never served (or tried) version 2
        assert f.v2_sha not in installed_files(tmp_path / second)  # nor downloaded it
        assert b.sync.serving_versions[MODEL] == "1"
        aborted = next(h["detail"] for h in view["history"] if h["decision"] == "aborted")
        assert first in aborted and "smoke_test_failed" in aborted, aborted
    for box in (a, b):  # every request the users sent was answered
        assert set(box.answers) == {200}, box.answers
