"""Daemons for the hostile-client tests: short limits so that timeouts fire within a test's budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, running_daemon

# Limits small enough to hit quickly; everything else is the daemon's default.
FUZZ_ENV = {
    "EDGE_AGENT_SERVER__HEADER_TIMEOUT_S": "1",
    "EDGE_AGENT_SERVER__BODY_TIMEOUT_S": "1",
    "EDGE_AGENT_SERVER__WRITE_TIMEOUT_S": "1",
    "EDGE_AGENT_SERVER__MAX_CONNECTIONS": "16",
    "EDGE_AGENT_SERVER__MAX_BODY_BYTES": "65536",
    "EDGE_AGENT_SERVER__MAX_HEADER_BYTES": "4096",
    "EDGE_AGENT_SERVER__MAX_HEADERS": "32",
}

# The model daemon answers quickly: few tokens by default, a short deadline, a small context (so
# "longer than the context" is cheap to send) and two threads.
MODEL_ENV = {
    **FUZZ_ENV,
    "EDGE_AGENT_SERVER__MAX_BODY_BYTES": str(1 << 20),
    "EDGE_AGENT_ENGINE__N_CTX": "512",
    "EDGE_AGENT_ENGINE__N_THREADS": "2",
    "EDGE_AGENT_ENGINE__DEFAULT_MAX_TOKENS": "4",
    "EDGE_AGENT_ENGINE__REQUEST_TIMEOUT_S": "3",
}


@pytest.fixture(scope="module")
def bare_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real daemon with no model: the HTTP layer and its limits, started in well under a second."""
    with running_daemon(tmp_path_factory.mktemp("bare"), None, env=FUZZ_ENV, wait=False) as d:
        d.wait_ready(status="no_model")
        yield d


@pytest.fixture(scope="module")
def model_daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    """A real daemon serving Gemma 3 270M with the short limits above."""
    with running_daemon(tmp_path_factory.mktemp("fuzz"), gemma_path, env=MODEL_ENV) as d:
        yield d
