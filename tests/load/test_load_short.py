"""Short forms of the load and soak runs (the long forms are bench/load_bench.py).

Against the real daemon and model: 16 concurrent clients for 10 s mixing completions, chat,
embeddings and model listing (plain and streamed), then a 300-request soak in which a quarter of
the requests are abandoned mid-flight. The only refusals allowed are 429/503 with Retry-After;
afterwards /health is ok, no generation slot is held, the daemon holds no more file descriptors
than after warm-up, and its resident memory stayed within 20 % of the warm-up figure (the bench
checks 10 % over longer runs, where start-up noise weighs less).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, running_daemon, uds_client
from tests.load.loadgen import LoadResult, available_kinds, run_load
from tests.load.procstats import fd_count, rss_bytes, settle

pytestmark = [pytest.mark.model, pytest.mark.slow]

ENV = {"EDGE_AGENT_ENGINE__N_THREADS": "2", "EDGE_AGENT_ENGINE__REQUEST_TIMEOUT_S": "30"}
RSS_SLACK = 1.20


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path
) -> Iterator[tuple[Daemon, dict[str, int]]]:
    """The daemon, warmed up with every kind of request, and its fd/RSS figures after warm-up."""
    with running_daemon(tmp_path_factory.mktemp("load"), gemma_path, env=ENV) as daemon:
        with uds_client(daemon.socket) as c:
            mix = available_kinds(c.get("/openapi.json").json())
        warm = asyncio.run(run_load(daemon.socket, clients=4, requests=24, mix=mix, max_tokens=8, seed=99))
        assert warm.failures() == [], warm.failures()[:3]
        _idle(daemon)
        figures = {
            "fds": settle(lambda: fd_count(daemon.proc.pid), 0, timeout=1.0),
            "rss": rss_bytes(daemon.proc.pid),
        }
        yield daemon, {**figures, **{f"mix_{k}": v for k, v in mix.items()}}


def _mix(figures: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix("mix_"): v for k, v in figures.items() if k.startswith("mix_")}


def _idle(daemon: Daemon, timeout: float = 15.0) -> None:
    """Every generation slot is free again (no leaked slot)."""
    import time

    deadline = time.monotonic() + timeout
    with uds_client(daemon.socket, timeout=10) as c:
        while True:
            depth = sum(m["queue_depth"] for m in c.get("/admin/status").json()["models"])
            if depth == 0:
                return
            assert time.monotonic() < deadline, f"{depth} requests still hold a slot"
            time.sleep(0.1)


def _after(daemon: Daemon, figures: dict[str, int], result: LoadResult) -> None:
    summary = result.summary()
    print(summary)
    assert result.failures() == [], [(o.kind, o.status, o.error) for o in result.failures()[:5]]
    assert daemon.proc.poll() is None
    assert daemon.health()["status"] == "ok"
    _idle(daemon)
    fds = settle(lambda: fd_count(daemon.proc.pid), figures["fds"], timeout=10)
    assert fds <= figures["fds"], f"{fds} fds open after load, {figures['fds']} after warm-up"
    rss = rss_bytes(daemon.proc.pid)
    assert rss <= figures["rss"] * RSS_SLACK, (
        f"RSS {rss >> 20} MiB after load, {figures['rss'] >> 20} after warm-up"
    )


def test_sixteen_clients_for_ten_seconds(loaded: tuple[Daemon, dict[str, int]]) -> None:
    daemon, figures = loaded
    result = asyncio.run(run_load(daemon.socket, clients=16, duration_s=10, mix=_mix(figures), max_tokens=4))
    assert result.completed > 16
    assert {o.kind for o in result.outcomes if o.ok} == set(_mix(figures))
    _after(daemon, figures, result)


def test_soak_300_requests_with_random_cancellations(loaded: tuple[Daemon, dict[str, int]]) -> None:
    daemon, figures = loaded
    result = asyncio.run(
        run_load(
            daemon.socket,
            clients=10,
            requests=300,
            mix=_mix(figures),
            max_tokens=4,
            cancel_probability=0.25,
            seed=7,
        )
    )
    assert len(result.outcomes) == 300
    assert sum(o.cancelled for o in result.outcomes) >= 30
    _after(daemon, figures, result)
