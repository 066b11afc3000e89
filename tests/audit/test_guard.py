"""The guard on the real aiohttp application over a Unix socket (no model needed).

The test process is the caller; its uid is bound (or not) by the policy under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, UnixConnector, web

from agent.access import Action
from agent.audit.store import AuditLog, audit_path
from agent.config import Settings
from agent.engine.pool import ModelPool
from agent.policy import accept_policy
from agent.server.guard import Guard, action_for, open_guard
from agent.server.http import build_app
from fleet.device_key import ensure_device_key

ME = os.geteuid()

# The server's request_context middleware stores request["peer"] and request["request_id"] under
# plain string keys, which aiohttp 3.14 warns about; that is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        pytest.param("POST", "/v1/completions", Action.INFER, id="completions"),
        pytest.param("POST", "/v1/chat/completions", Action.INFER, id="chat"),
        pytest.param("POST", "/v1/embeddings", Action.EMBED, id="embeddings"),
        pytest.param("GET", "/v1/models", Action.MODELS_LIST, id="models"),
        pytest.param("GET", "/v1/models/gemma", Action.MODELS_LIST, id="one-model"),
        pytest.param("GET", "/admin/status", Action.STATUS, id="status"),
        pytest.param("GET", "/metrics", Action.STATUS, id="metrics"),
        pytest.param("POST", "/admin/select", Action.MODELS_ADMIN, id="select"),
        pytest.param("GET", "/health", None, id="health-is-public"),
        pytest.param("POST", "/health", Action.ADMIN, id="other-method-needs-admin"),
        pytest.param("GET", "/v2/unknown", Action.ADMIN, id="unknown-route-needs-admin"),
    ],
)
def test_route_actions(method: str, path: str, action: Action | None) -> None:
    assert action_for(method, path) is action


def app_policy(actions: list[str], models: list[str] | None = None) -> dict[str, Any]:
    permission: dict[str, Any] = {"actions": actions}
    if models is not None:
        permission["models"] = models
    return {"roles": {"app": {"permissions": [permission]}}, "bindings": [{"role": "app", "uids": [ME]}]}


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[ClientSession, Guard]]:
    pool = ModelPool()
    guard = open_guard(settings, pool)
    app = build_app(
        pool, {"max_body_bytes": 1 << 16, "default_max_tokens": 16, "request_timeout_s": 30}, guard=guard
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = settings.state_dir / "t.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        async with ClientSession(connector=UnixConnector(path=str(sock))) as session:
            yield session, guard
    finally:
        await runner.cleanup()
        guard.close()


async def call(session: ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    async with session.request(method, f"http://localhost{path}", json=body) as r:
        return r.status, await r.json(), r.headers


def records(state: Path) -> list[dict[str, Any]]:
    return [s.record() for s in AuditLog(audit_path(state)).iter_records()]


def test_decisions_over_http_are_enforced_and_recorded(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"state_dir": tmp_path, "access": app_policy(["infer", "models.list"], ["gemma-*"])}
    )

    async def run() -> list[tuple[int, Any, Any]]:
        async with serving(settings) as (s, _):
            return [
                await call(s, "GET", "/health"),
                await call(s, "GET", "/v1/models"),
                await call(s, "GET", "/admin/status"),
                await call(s, "POST", "/v1/completions", {"model": "llama-3", "prompt": "x"}),
                await call(s, "POST", "/v1/completions", {"model": "gemma-3", "prompt": "x"}),
                await call(s, "GET", "/nowhere"),
            ]

    health, models, status, other_model, gemma, unknown = asyncio.run(run())
    assert health[0] == 200 and models[0] == 200
    assert (
        status[0] == 403
        and "permission 'status' denied: not granted by role(s) app" in status[1]["error"]["message"]
    )
    assert other_model[0] == 403 and "infer on model 'llama-3'" in other_model[1]["error"]["message"]
    assert gemma[0] == 404  # allowed, then the pool does not serve that model
    assert unknown[0] == 403 and "'admin'" in unknown[1]["error"]["message"]
    got = [(r["action"], r["resource"], r["outcome"], r["details"].get("status")) for r in records(tmp_path)]
    assert got == [
        ("config.load", None, "ok", None),
        ("status", None, "denied", 403),
        ("infer", "llama-3", "denied", 403),
        ("infer", "gemma-3", "error", 404),
        ("admin", None, "denied", 403),
    ]  # health and the allowed model listing are not recorded (audit_reads = false)
    denied = records(tmp_path)[1]
    assert denied["actor"]["uid"] == ME and denied["actor"]["pid"] == os.getpid()
    assert denied["details"]["route"] == "GET /admin/status" and len(denied["details"]["request_id"]) == 32


def test_allowed_reads_recorded_when_asked(tmp_path: Path) -> None:
    settings = Settings.model_validate({"state_dir": tmp_path, "audit": {"audit_reads": True}})

    async def run() -> int:
        async with serving(settings) as (s, _):
            return (await call(s, "GET", "/v1/models"))[0]

    assert asyncio.run(run()) == 200
    assert [(r["action"], r["outcome"]) for r in records(tmp_path)][1:] == [("models.list", "ok")]


def test_full_log_fails_closed_with_503(tmp_path: Path) -> None:
    settings = Settings.model_validate({"state_dir": tmp_path, "audit": {"max_bytes": 65536}})
    log = AuditLog(audit_path(tmp_path), key=ensure_device_key(tmp_path))
    while log.stats().used_bytes < 65536:
        log.record("infer", "m", "ok", "x" * 500)

    async def run() -> tuple[int, Any, Any]:
        async with serving(settings) as (s, _):
            return await call(s, "POST", "/v1/completions", {"prompt": "x"})

    status, body, headers = asyncio.run(run())
    assert status == 503 and body["error"]["code"] == "audit_full"
    assert "refusing new requests" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
    assert AuditLog(audit_path(tmp_path)).stats().refused == 1


def test_newer_hub_policy_applies_without_restart_and_is_recorded(tmp_path: Path) -> None:
    settings = Settings.model_validate({"state_dir": tmp_path, "access": app_policy(["models.list"])})
    newer = {"version": 2, **app_policy(["status"])}

    async def run() -> list[int]:
        async with serving(settings) as (s, _):
            before = (await call(s, "GET", "/v1/models"))[0]
            accept_policy(tmp_path, json.dumps(newer).encode(), 2)
            await asyncio.sleep(1.1)  # the holder re-checks the policy file once a second
            return [
                before,
                (await call(s, "GET", "/v1/models"))[0],
                (await call(s, "GET", "/admin/status"))[0],
            ]

    started = time.monotonic()
    assert asyncio.run(run()) == [200, 403, 200]
    assert time.monotonic() - started < 30
    loads = [r for r in records(tmp_path) if r["action"] == "policy.load"]
    assert len(loads) == 1 and loads[0]["resource"] == "hub v2"
    assert loads[0]["details"]["previous"] == "config [access]"


@pytest.mark.parametrize(
    ("access", "query", "status", "expected"),
    [
        pytest.param({}, "?n=2", 200, None, id="admin-reads-the-tail"),
        pytest.param({}, "?n=0", 400, "n must be an integer between 1 and 1000", id="bad-count"),
        pytest.param(app_policy(["audit.read"]), "", 200, None, id="audit-read-permission"),
        pytest.param(app_policy(["infer", "status"]), "", 403, "'audit.read'", id="without-audit-read"),
    ],
)
def test_audit_route(
    tmp_path: Path, access: dict[str, Any], query: str, status: int, expected: str | None
) -> None:
    settings = Settings.model_validate({"state_dir": tmp_path, "access": access})

    async def run() -> tuple[int, Any, Any]:
        async with serving(settings) as (s, _):
            await call(s, "POST", "/v1/completions", {"prompt": "x"})  # one more record (503: no model)
            return await call(s, "GET", f"/admin/audit{query}")

    got, body, _ = asyncio.run(run())
    assert got == status
    if expected is not None:
        assert expected in body["error"]["message"]
    else:
        actions = [r["action"] for r in body["data"]]
        assert actions[-2:] == ["config.load", "infer"] and body["head_seq"] == 2 and body["backlog"] == 2


def test_model_administration_is_scoped_by_the_model_named_in_the_body(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"state_dir": tmp_path, "access": app_policy(["models.admin"], ["gemma-*"])}
    )

    async def run() -> tuple[int, Any, Any]:
        async with serving(settings) as (s, _):
            return await call(s, "POST", "/admin/select", {"model": "llama-3"})

    status, body, _ = asyncio.run(run())
    assert status == 403 and "models.admin on model 'llama-3'" in body["error"]["message"]
    assert records(tmp_path)[-1]["resource"] == "llama-3"


def test_stream_record_is_on_disk_before_done_event(tmp_path: Path) -> None:
    from agent.server.usage import note_usage, record_before_done

    settings = Settings(state_dir=tmp_path)
    sock = tmp_path / "t.sock"

    async def streaming(request: web.Request) -> web.StreamResponse:
        """What openai_routes._stream does at its end, with a slow tail after [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": []}\n\n')
        note_usage(request, 3, 5)
        await record_before_done(request)
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.5)
        return response

    async def run() -> list[dict[str, Any]]:
        pool = ModelPool()
        guard = open_guard(settings, pool)
        limits = {"max_body_bytes": 1 << 16, "default_max_tokens": 16, "request_timeout_s": 30}
        app = build_app(pool, limits, guard=guard)
        app.router.add_post("/admin/models/stream", streaming)  # an audited action (models.admin)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        seen: list[dict[str, Any]] = []
        try:
            async with (
                ClientSession(connector=UnixConnector(path=str(sock))) as s,
                s.post("http://localhost/admin/models/stream", json={}) as r,
            ):
                async for line in r.content:
                    if line.strip() == b"data: [DONE]":
                        seen = [x for x in records(tmp_path) if x["action"] == "models.admin"]  # at [DONE]
                        break
        finally:
            await runner.cleanup()
            guard.close()
        return seen

    seen = asyncio.run(run())
    assert len(seen) == 1
    assert seen[0]["outcome"] == "ok" and seen[0]["details"]["completion_tokens"] == 5
    assert [r["action"] for r in records(tmp_path)].count("models.admin") == 1  # not recorded twice


def test_export_mark_uploaded_reopens_a_full_log_while_serving(tmp_path: Path) -> None:
    from agent.cli import main

    settings = Settings.model_validate({"state_dir": tmp_path, "audit": {"max_bytes": 65536}})
    log = AuditLog(audit_path(tmp_path), key=ensure_device_key(tmp_path))
    while log.stats().used_bytes < 65536:
        log.record("infer", "m", "ok", "x" * 500)
    argv = [
        "--state-dir",
        str(tmp_path),
        "audit",
        "export",
        "-o",
        str(tmp_path / "x.jsonl"),
        "--mark-uploaded",
    ]

    async def run() -> list[str]:
        async with serving(settings) as (s, _):
            before = (await call(s, "POST", "/v1/completions", {"prompt": "x"}))[1]["error"]["code"]
            assert await asyncio.to_thread(main, argv) == 0
            # The writer recounts the log's size (at most once a second) when a refusal is recorded.
            deadline = time.monotonic() + 15
            after = before
            while after == "audit_full" and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                after = (await call(s, "POST", "/v1/completions", {"prompt": "x"}))[1]["error"]["code"]
            return [before, after]

    before, after = asyncio.run(run())
    assert before == "audit_full"
    assert after == "model_not_ready"  # admitted again (this app has no model to serve it)
    gap = next(r for r in records(tmp_path) if r["action"] == "audit.gap")
    assert gap["details"]["refused"] >= 1
    assert records(tmp_path)[-1]["action"] == "infer"
    report = AuditLog(audit_path(tmp_path)).verify([ensure_device_key(tmp_path).public])
    assert report.ok, report.problems


@pytest.mark.parametrize(
    ("access", "code", "expected"),
    [
        pytest.param({}, 0, "config.load", id="granted"),
        pytest.param(app_policy(["status"]), 1, "HTTP 403: permission 'audit.read' denied", id="denied"),
    ],
)
def test_cli_tail_via_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], access: dict[str, Any], code: int, expected: str
) -> None:
    from agent.cli import main

    settings = Settings.model_validate({"state_dir": tmp_path, "access": access})
    argv = [
        "--state-dir",
        str(tmp_path),
        "audit",
        "tail",
        "--via-socket",
        "--socket",
        str(tmp_path / "t.sock"),
    ]

    async def run() -> int:
        async with serving(settings):
            return await asyncio.to_thread(main, argv)

    assert asyncio.run(run()) == code
    captured = capsys.readouterr()
    assert expected in captured.out + captured.err
