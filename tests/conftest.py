"""Shared fixtures. Async tests are written ``async def test_...`` (the one convention): the hook
below runs each on a fresh event loop with a time limit, no plugin needed."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.daemon import Daemon, running_daemon

MODEL_CACHE = Path(
    os.environ.get("EDGE_AGENT_TEST_MODELS", Path.home() / ".cache" / "edge-agent" / "test-models")
)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that configures structlog (e.g. by running a CLI command in-process) must not leave
    loggers bound to its captured, later closed, stdout for the tests after it."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled (and sha256-checked) from its PyPI packages."""
    from agent.demo import demo_model_file

    return demo_model_file(MODEL_CACHE)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    """One real daemon per test module, serving Gemma over a fresh socket."""
    with running_daemon(tmp_path_factory.mktemp("agent"), gemma_path) as d:
        yield d


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One real PostgreSQL cluster for the session (tests/hub/postgres.py)."""
    from tests.hub.postgres import Postgres, available

    if not available():
        pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: run scripts/system-deps.sh")
    pg = Postgres()
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """The hub database of one test, on each engine: a fresh SQLite file, or a fresh database in
    the session's PostgreSQL cluster (its ``postgresql://`` URL)."""
    if request.param == "sqlite":
        return tmp_path / "hub.db"
    pg = request.getfixturevalue("pg_cluster")
    url: str = pg.new_database()
    return url


ASYNC_TEST_TIMEOUT_S = 300


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop, bounded by :data:`ASYNC_TEST_TIMEOUT_S`."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), ASYNC_TEST_TIMEOUT_S))
    return True
