from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleetsim.pki import fleet_pki
from tests.sync.broker import Broker, free_port

BOXES = 20


@pytest.fixture(scope="session")
def sim_pki() -> Path:
    """Certificates for ``hub``, ``operator`` and ``sim-00000`` ... (cached across runs)."""
    return fleet_pki(BOXES)


@pytest.fixture(scope="module")
def sim_broker(tmp_path_factory: pytest.TempPathFactory, sim_pki: Path) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("simbroker"), sim_pki, free_port())
    b.start()
    yield b
    b.cleanup()
