from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.sync.certs import make_test_pki
from tests.sync.broker import CLIENTS, Broker, free_port


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
    b.cleanup()


@pytest.fixture
def own_broker(tmp_path: Path, certdir: Path) -> Iterator[Broker]:
    """A Mosquitto for one test, free to be restarted or stopped."""
    b = Broker(tmp_path / "broker", certdir, free_port())
    b.workdir.mkdir()
    b.start()
    yield b
    b.cleanup()
