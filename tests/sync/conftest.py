from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.sync.certs import make_test_pki
from tests.sync.broker import CLIENTS, Broker, free_port

ASYNC_TEST_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def certdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_test_pki(d, CLIENTS)
    return d


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, certdir: Path) -> Iterator[Broker]:
    """A real Mosquitto shared by the session (tests that restart it use ``own_broker``)."""
    b = Broker(tmp_path_factory.mktemp("broker"), certdir, free_port())
    b.start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path, certdir: Path) -> Iterator[Broker]:
    """A Mosquitto for one test, free to be restarted or stopped."""
    b = Broker(tmp_path / "broker", certdir, free_port())
    b.workdir.mkdir()
    b.start()
    yield b
    b.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests of this directory on a fresh event loop (no plugin needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**args), ASYNC_TEST_TIMEOUT_S))
    return True
