"""A stream is audited before its text leaves (issue 15, low): with ``fail_closed``, a log that
cannot be written refuses the stream before its first byte, and a write failure in the middle of a
stream stops it at the next chunk (an error event, no ``[DONE]``) instead of sending the rest.
The log's own commit is made to fail (as a full disk does); the server, guard and stream are real."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientPayloadError, ClientSession, UnixConnector, web

from agent.audit.store import AuditLog, audit_path
from agent.config import Settings
from agent.engine.pool import ModelPool
from agent.server.guard import Guard, open_guard
from agent.server.http import build_app
from tests.fakes.engine import FakeBehaviour, FakeFactory, fake_info

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
POLICY = {
    "roles": {"app": {"permissions": [{"actions": ["infer"]}]}},
    "bindings": [{"role": "app", "uids": [os.geteuid()]}],
}


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[ClientSession, Guard]]:
    settings = Settings.model_validate({"state_dir": tmp_path, "access": POLICY})
    pool = ModelPool(FakeFactory({"m": FakeBehaviour(token_delay_s=0.02)}), memory_budget=1 << 30)
    pool.register(fake_info("m"), default=True)
    guard = open_guard(settings, pool)
    app = build_app(
        pool, {"max_body_bytes": 1 << 16, "default_max_tokens": 16, "request_timeout_s": 30}, guard=guard
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "t.sock")).start()
    try:
        async with ClientSession(connector=UnixConnector(path=str(tmp_path / "t.sock"))) as session:
            for _ in range(100):  # load the model
                async with session.post(
                    "http://localhost/v1/completions", json={"prompt": "x", "max_tokens": 1}
                ) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            yield session, guard
    finally:
        await runner.cleanup()
        guard.close()
        await pool.close()


def break_log(guard: Guard, after_commits: int) -> None:
    """From the given commit on, every commit of the log fails like a full disk."""
    log = guard.audit
    real = log._transact
    count = {"n": 0}

    def failing(conn: Any, items: Any, results: Any) -> None:
        count["n"] += 1
        if count["n"] > after_commits:
            raise OSError(28, "No space left on device")
        real(conn, items, results)

    log._transact = failing  # type: ignore[method-assign]


async def stream(session: ClientSession, tokens: int) -> tuple[int, bytes]:
    """Status and what arrived (a stream cut off without its final chunk is read up to the cut)."""
    body = {"prompt": "x", "max_tokens": tokens, "stream": True}
    got = bytearray()
    async with session.post("http://localhost/v1/completions", json=body) as r:
        try:
            async for part in r.content.iter_any():
                got += part
        except ClientPayloadError:
            pass
        return r.status, bytes(got)


@pytest.mark.parametrize(
    ("after", "status", "data_events"),
    [
        pytest.param(0, 503, 0, id="log-unwritable-before-the-stream-nothing-sent"),
        pytest.param(1, 200, None, id="log-fails-mid-stream-stops-at-the-next-chunk"),
    ],
)
def test_a_stream_does_not_outrun_its_audit_record(
    tmp_path: Path, after: int, status: int, data_events: int | None
) -> None:
    async def run() -> tuple[int, bytes]:
        async with serving(tmp_path) as (session, guard):
            break_log(guard, after)
            if after:  # the started record commits, then a later commit fails during the stream

                async def fail_soon() -> None:
                    await asyncio.sleep(0.15)
                    guard.audit.submit(guard_entry())

                asyncio.get_running_loop().create_task(fail_soon())
            return await stream(session, 200)

    got, raw = asyncio.run(run())
    assert got == status, raw[:300]
    text = raw.decode()
    assert "[DONE]" not in text
    if data_events == 0:
        assert "data:" not in text or "audit" in text
    else:
        chunks = [line for line in text.splitlines() if line.startswith("data: {") and '"choices"' in line]
        assert 0 < len(chunks) < 200  # stopped early, not the whole completion
        assert "audit" in text  # the error event names the audit log


def guard_entry() -> Any:
    from fleet.chain import Entry

    return Entry("test", None, "ok", "a record that hits the failing disk", {"uid": 0}, {})


def test_the_started_record_is_written_before_the_first_byte(tmp_path: Path) -> None:
    async def run() -> int:
        async with serving(tmp_path) as (session, _):
            return (await stream(session, 5))[0]

    assert asyncio.run(run()) == 200
    records = [s.record() for s in AuditLog(audit_path(tmp_path)).iter_records()]
    streamed = [(r["outcome"], r["details"].get("stream")) for r in records if r["action"] == "infer"]
    assert streamed[-2:] == [("started", True), ("ok", None)]
