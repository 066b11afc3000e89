"""A role's token limit and the generation read one value (issue 15, medium #4).

``/v1/completions`` has no ``max_completion_tokens`` (the field is dropped as unknown) while the
guard used to read it first: ``{"max_completion_tokens": 1, "max_tokens": 4000}`` passed a limit of
256 and generated 4,000 tokens. Now the guard validates the body with the route's own model, checks
its ``token_budget`` and hands that very object to the handler. The fake engine generates exactly
``max_tokens`` tokens, so ``usage.completion_tokens`` shows what the handler asked for.
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

from agent.config import Settings
from agent.engine.pool import ModelPool
from agent.server.guard import open_guard
from agent.server.http import build_app
from tests.daemon import running_daemon, uds_client
from tests.fakes.engine import FakeFactory, fake_info

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

LIMIT = 256
POLICY = {
    "roles": {"app": {"permissions": [{"actions": ["infer"]}], "limits": {"max_tokens": LIMIT}}},
    "bindings": [{"role": "app", "uids": [os.geteuid()]}],
}
CHAT = [{"role": "user", "content": "hi"}]

# (route, body fields, expected status, completion tokens generated when 200)
CASES = [
    pytest.param(
        "/v1/completions",
        {"max_completion_tokens": 1, "max_tokens": 4000},
        400,
        None,
        id="completions-ignores-max_completion_tokens-so-the-guard-does-too",
    ),
    pytest.param("/v1/completions", {"max_tokens": 4000.0}, 400, None, id="completions-float-over-limit"),
    pytest.param("/v1/completions", {"max_tokens": 200}, 200, 200, id="completions-within-limit"),
    pytest.param("/v1/completions", {}, 200, 16, id="completions-default-budget"),
    pytest.param(
        "/v1/chat/completions",
        {"max_completion_tokens": 3, "max_tokens": 4000},
        200,
        3,
        id="chat-max_completion_tokens-wins-and-is-what-runs",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"max_completion_tokens": 4000, "max_tokens": 1},
        400,
        None,
        id="chat-max_completion_tokens-over-limit",
    ),
    pytest.param("/v1/chat/completions", {"max_tokens": 300}, 400, None, id="chat-max_tokens-over-limit"),
    pytest.param(
        "/v1/completions", {"max_tokens": "4000"}, 400, None, id="string-budget-refused-by-the-schema"
    ),
]


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[ClientSession]:
    settings = Settings.model_validate({"state_dir": tmp_path, "access": POLICY})
    pool = ModelPool(FakeFactory(), memory_budget=1 << 30)
    pool.register(fake_info("m", task="chat"), default=True)
    guard = open_guard(settings, pool)
    app = build_app(
        pool, {"max_body_bytes": 1 << 16, "default_max_tokens": 16, "request_timeout_s": 30}, guard=guard
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = tmp_path / "t.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        async with ClientSession(connector=UnixConnector(path=str(sock))) as session:
            yield session
    finally:
        await runner.cleanup()
        guard.close()
        await pool.close()


@pytest.mark.parametrize(("route", "fields", "status", "generated"), CASES)
def test_the_limit_checks_what_the_handler_generates(
    tmp_path: Path, route: str, fields: dict[str, Any], status: int, generated: int | None
) -> None:
    body: dict[str, Any] = {"model": "m", **fields}
    body.update({"messages": CHAT} if "chat" in route else {"prompt": "hi"})

    async def run() -> tuple[int, Any]:
        async with serving(tmp_path) as s:
            for _ in range(100):  # the first request loads the model (503 meanwhile)
                async with s.post(f"http://localhost{route}", json=body) as r:
                    if r.status != 503:
                        return r.status, await r.json()
                await asyncio.sleep(0.05)
            raise AssertionError("the fake model never loaded")

    got, answer = asyncio.run(run())
    assert got == status, answer
    if status == 200:
        assert answer["usage"]["completion_tokens"] == generated
    elif all(isinstance(v, int | float) for v in fields.values()):  # a number over the limit
        assert answer["error"]["code"] == "max_tokens_limit"
    else:  # a budget of the wrong type: the schema names it
        assert answer["error"]["param"] == "max_tokens"


def test_the_real_daemon_refuses_the_completions_bypass(tmp_path: Path) -> None:
    """The same case through ``edge-agent run``: refused by the guard before any model is needed."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"version": 1, **POLICY}))
    env = {"EDGE_AGENT_ACCESS__POLICY_FILE": str(policy)}
    with running_daemon(tmp_path / "state", None, env=env, wait=False) as daemon:
        for _ in range(600):
            if daemon.socket.exists():
                break
            time.sleep(0.1)
        with uds_client(daemon.socket, timeout=30) as c:
            for _ in range(100):
                try:
                    r = c.post(
                        "/v1/completions",
                        json={"prompt": "x", "max_completion_tokens": 1, "max_tokens": 4000},
                    )
                    break
                except Exception:
                    time.sleep(0.1)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "max_tokens_limit"
            assert "max_tokens 4000 exceeds the limit 256" in r.json()["error"]["message"]
