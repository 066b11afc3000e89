"""Model bytes from untrusted HTTP(S) mirrors (real nginx), MQTT chunks as the fallback, the rate
limit and the download window, over a real Mosquitto and a real signed repository."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.sync.errors import TransferError
from agent.sync.gate import TransferGate
from fleet.messages import Status
from registry.metadata import ModelManifest, digest_file
from registry.repository import Repository
from tests.sync.broker import Broker
from tests.sync.helpers import (
    enrolled_device,
    installed_files,
    make_blob,
    new_repo,
    offline_service,
    publish_model,
    running_device,
    running_hub,
    wait_for,
)
from tests.sync.mirror_server import NGINX, Nginx, SilentServer, corrupt, free_port, mirror_copy

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/system-deps.sh)")
REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@dataclass
class Published:
    repo: Repository
    manifest: ModelManifest


@pytest.fixture
def published(tmp_path: Path) -> Published:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 6 * MiB + 4321)
    return Published(repo, publish_model(repo, model, "m"))


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def make(name: str, *, tls: bool = False) -> Nginx:
        server = Nginx(tmp_path / f"{name}-work", tmp_path / f"{name}-root", tls=tls)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@dataclass(frozen=True)
class MirrorCase:
    mirrors: tuple[str, ...]
    """Each: ``good``, ``corrupt`` (one byte flipped in chunk 2), ``down`` (nothing listens),
    ``hung`` (accepts, never answers), ``tls`` (HTTPS, CA configured), ``tls-untrusted``."""
    mqtt_chunks: Callable[[int], set[int]]
    """The chunk indexes MQTT must carry, given the chunk count."""
    skipped: tuple[str, ...] = ()
    """Reasons of the mirrors given up on (once each: then benched for the next targets)."""
    bad_chunks: int = 0


MIRROR_CASES = [
    pytest.param(MirrorCase(("good",), lambda n: set()), id="good-mirror-serves-everything"),
    pytest.param(MirrorCase(("tls",), lambda n: set()), id="https-mirror-with-configured-ca"),
    pytest.param(MirrorCase(("corrupt",), lambda n: {2}, bad_chunks=1), id="corrupt-chunk-comes-from-mqtt"),
    pytest.param(
        MirrorCase(("corrupt", "good"), lambda n: set(), bad_chunks=1),
        id="corrupt-chunk-comes-from-next-mirror",
    ),
    pytest.param(
        MirrorCase(("down",), lambda n: set(range(n)), ("unavailable",)), id="down-mirror-falls-back"
    ),
    pytest.param(MirrorCase(("hung",), lambda n: set(range(n)), ("timeout",)), id="hung-mirror-times-out"),
    pytest.param(
        MirrorCase(("down", "good"), lambda n: set(), ("unavailable",)), id="down-mirror-then-good-one"
    ),
    pytest.param(
        MirrorCase(("tls-untrusted",), lambda n: set(range(n)), ("unavailable",)),
        id="https-mirror-with-unknown-ca-is-skipped",
    ),
]


@pytest.mark.parametrize("case", MIRROR_CASES)
async def test_mirror_sources(
    broker: Broker,
    tmp_path: Path,
    published: Published,
    nginx_factory: Callable[..., Nginx],
    case: MirrorCase,
) -> None:
    manifest = published.manifest
    urls: list[str] = []
    ca_file: Path | None = None
    silent: list[SilentServer] = []
    for i, kind in enumerate(case.mirrors):
        if kind in ("good", "corrupt", "tls", "tls-untrusted"):
            server = nginx_factory(f"m{i}", tls=kind.startswith("tls"))
            mirror_copy(published.repo.path, server.root)
            if kind == "corrupt":
                corrupt(server.root, manifest.sha256, 2 * manifest.chunk_size + 17)
            if kind == "tls":
                ca_file = server.cert
            urls.append(server.url)
        elif kind == "down":
            urls.append(f"http://127.0.0.1:{free_port()}/")
        elif kind == "hung":
            silent.append(SilentServer())
            urls.append(silent[-1].url)
    enrolled_device(tmp_path / "dev", published.repo.path, "dev-a")
    try:
        async with (
            running_hub(broker, published.repo.path),
            running_device(
                broker,
                tmp_path / "dev",
                "dev-a",
                mirrors=tuple(urls),
                mirror_ca_file=ca_file,
                mirror_timeout_s=1.0,
            ) as dev,
        ):
            result = await dev.update()
    finally:
        for s in silent:
            s.close()
    assert manifest.target_path in result.installed
    stats = dev.fetcher.transfers[-1]
    count = len(manifest.chunk_sha256)
    assert set(stats.requested) == case.mqtt_chunks(count)
    assert stats.mirror_chunks == count - len(case.mqtt_chunks(count))
    assert stats.mirror_bad_chunks == case.bad_chunks
    assert sum("from mirror" in d for _r, d in dev.refusals) == case.bad_chunks
    # A skipped mirror is skipped once (by the first target, the deployment document), then benched.
    assert dev.fetcher.totals.mirror_skipped == collections.Counter(case.skipped)
    installed = tmp_path / "dev" / "registry" / "blobs" / "sha256" / manifest.sha256
    assert digest_file(installed).sha256 == manifest.sha256


async def test_mirrors_named_by_the_signed_deployment(
    broker: Broker, certdir: Path, tmp_path: Path, nginx_factory: Callable[..., Nginx]
) -> None:
    """``edge-hub deployment set --mirror``: the group's signed deployment names the mirror; the
    box (no ``[hub] mirrors``) learns it from the verified document and fetches the model there."""
    from registry.publish import set_deployment

    repo = new_repo(tmp_path / "repo")
    manifest = publish_model(repo, make_blob(tmp_path / "s.gguf", 3 * MiB + 5), "s", group=None)
    server = nginx_factory("signed")
    set_deployment(repo, "edge", "s", mirrors=(server.url,))
    mirror_copy(repo.path, server.root)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    service = offline_service(tmp_path / "dev", certdir)
    async with (
        running_hub(broker, repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", mirrors=service.mirror_urls) as dev,
    ):
        service.registry = dev.registry  # the daemon's one registry (agent.daemon.app)
        result = await dev.update()
    service.ledger.close()
    assert manifest.target_path in result.installed
    assert service.mirror_urls() == [server.url]
    stats = dev.fetcher.transfers[-1]
    assert (stats.mirror_chunks, sum(stats.requested.values())) == (4, 0)


async def test_mirror_of_wrong_bytes_is_dropped_after_three_bad_chunks(
    broker: Broker, tmp_path: Path, published: Published, nginx_factory: Callable[..., Nginx]
) -> None:
    """A mirror serving garbage costs at most three chunks; the rest comes over MQTT."""
    manifest = published.manifest
    server = nginx_factory("bad")
    mirror_copy(published.repo.path, server.root)
    for i in range(len(manifest.chunk_sha256)):
        corrupt(server.root, manifest.sha256, i * manifest.chunk_size)
    enrolled_device(tmp_path / "dev", published.repo.path, "dev-a")
    async with (
        running_hub(broker, published.repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", mirrors=(server.url,)) as dev,
    ):
        await dev.update()
    stats = dev.fetcher.transfers[-1]
    assert stats.mirror_bad_chunks == 3
    assert stats.mirror_skipped == [(server.url, "wrong_bytes")]
    assert set(stats.requested) == set(range(len(manifest.chunk_sha256)))
    assert manifest.sha256 in installed_files(tmp_path / "dev")


@pytest.mark.parametrize("source", [pytest.param("mirror", id="mirror"), pytest.param("mqtt", id="mqtt")])
async def test_rate_limit_holds(
    broker: Broker, tmp_path: Path, nginx_factory: Callable[..., Nginx], source: str
) -> None:
    """4 MiB at 1 MiB/s (one second of burst): at least 3 s, whichever source carries it."""
    repo = new_repo(tmp_path / "repo")
    manifest = publish_model(repo, make_blob(tmp_path / "r.gguf", 4 * MiB), "r")
    mirrors: tuple[str, ...] = ()
    if source == "mirror":
        server = nginx_factory("rate")
        mirror_copy(repo.path, server.root)
        mirrors = (server.url,)
    gate = TransferGate(MiB)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    async with (
        running_hub(broker, repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", mirrors=mirrors, gate=gate) as dev,
    ):
        t0 = time.monotonic()
        await dev.update()
        elapsed = time.monotonic() - t0
    assert manifest.sha256 in installed_files(tmp_path / "dev")
    assert elapsed >= 3.0, f"4 MiB at 1 MiB/s took {elapsed:.2f} s"
    assert gate.rate_waits >= 3
    stats = dev.fetcher.transfers[-1]
    assert (stats.mirror_chunks, sum(stats.requested.values())) == ((4, 0) if source == "mirror" else (0, 4))


class Clock:
    """A UTC wall clock the test moves (the gate's ``now``)."""

    def __init__(self, hour: int) -> None:
        self.at = datetime(2030, 1, 1, hour, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.at


@pytest.mark.parametrize(
    "source", [pytest.param("mirror", id="from-mirror"), pytest.param("mqtt", id="over-mqtt")]
)
async def test_download_window(
    broker: Broker,
    tmp_path: Path,
    published: Published,
    nginx_factory: Callable[..., Nginx],
    source: str,
) -> None:
    """Outside the window nothing is fetched (no range request, no chunk request); inside, the
    transfer completes."""
    manifest = published.manifest
    server = nginx_factory("win")
    mirror_copy(published.repo.path, server.root)
    mirrors = (server.url,) if source == "mirror" else ()
    clock = Clock(hour=12)
    gate = TransferGate(window="01:00-05:00", now=clock)
    enrolled_device(tmp_path / "dev", published.repo.path, "dev-a")
    async with (
        running_hub(broker, published.repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", mirrors=mirrors, gate=gate) as dev,
    ):
        with pytest.raises(TransferError) as err:
            await dev.update()
        assert err.value.status == Status.DOWNLOAD_WINDOW.value
        assert "01:00-05:00" in str(err.value)
        assert gate.waiting == "window"
        assert dev.fetcher.totals.bytes_received == 0
        assert dev.fetcher.totals.chunks_requested == 0
        assert server.requests_for(manifest.sha256) == 0
        assert gate.opens_in_s() == 13 * 3600
        clock.at = clock.at.replace(hour=2)
        result = await dev.update()
        assert gate.waiting is None
    assert manifest.target_path in result.installed
    stats = dev.fetcher.transfers[-1]
    assert stats.mirror_chunks == (len(manifest.chunk_sha256) if source == "mirror" else 0)


@pytest.mark.parametrize(
    "source", [pytest.param("mirror", id="from-mirror"), pytest.param("mqtt", id="over-mqtt")]
)
async def test_window_closing_pauses_at_a_chunk_boundary_and_resumes(
    broker: Broker,
    tmp_path: Path,
    published: Published,
    nginx_factory: Callable[..., Nginx],
    source: str,
) -> None:
    manifest = published.manifest
    server = nginx_factory("pause")
    mirror_copy(published.repo.path, server.root)
    mirrors = (server.url,) if source == "mirror" else ()
    clock = Clock(hour=2)
    gate = TransferGate(2 * MiB, window="01:00-05:00", now=clock)
    enrolled_device(tmp_path / "dev", published.repo.path, "dev-a")
    async with (
        running_hub(broker, published.repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", mirrors=mirrors, gate=gate, window=2) as dev,
    ):
        update = asyncio.ensure_future(dev.update())
        await wait_for(lambda: dev.fetcher.totals.bytes_received >= 2 * MiB, 30, "two chunks")
        clock.at = clock.at.replace(hour=6)  # the window closes mid-transfer
        with pytest.raises(TransferError) as err:
            await update
        assert err.value.status == Status.DOWNLOAD_WINDOW.value
        partial = tmp_path / "dev" / "sync" / "partial" / f"{manifest.sha256}.part"
        assert partial.exists()
        got = dev.fetcher.totals.bytes_received
        assert got < manifest.file_size
        clock.at = clock.at.replace(hour=3)
        result = await dev.update()
    assert manifest.target_path in result.installed
    stats = dev.fetcher.transfers[-1]
    assert stats.resumed_chunks >= 2
    assert (
        digest_file(tmp_path / "dev" / "registry" / "blobs" / "sha256" / manifest.sha256).sha256
        == manifest.sha256
    )


async def test_resume_from_mirror_after_kill(
    broker: Broker, tmp_path: Path, nginx_factory: Callable[..., Nginx]
) -> None:
    """SIGKILL of a device process mid-transfer from a mirror (rate-limited so the kill lands
    mid-way): the next run keeps the verified chunks and fetches only the rest, from the mirror."""
    repo = new_repo(tmp_path / "repo")
    manifest = publish_model(repo, make_blob(tmp_path / "k.gguf", 8 * MiB), "k")
    server = nginx_factory("kill")
    mirror_copy(repo.path, server.root)
    state = enrolled_device(tmp_path / "dev", repo.path, "dev-a").dir.parent
    partial = state / "sync" / "partial" / f"{manifest.sha256}.part"

    def run(rate: int) -> subprocess.Popen[bytes]:
        args = [str(state), str(broker.port), str(broker.certdir), "dev-a", "2", server.url, str(rate)]
        return subprocess.Popen(
            [sys.executable, "-m", "tests.sync.device_proc", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

    async with running_hub(broker, repo.path):
        proc = run(2 * MiB)
        assert proc.stdout is not None
        await asyncio.to_thread(proc.stdout.readline)  # "ready"
        await wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 30, "the partial file")
        await asyncio.sleep(1.6)  # about 2 MiB burst + 3 MiB at 2 MiB/s: some chunks, not all
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        assert partial.exists()
        proc = run(0)
        out, _ = await asyncio.to_thread(proc.communicate, None, 120)
    assert proc.returncode == 0, out
    import json

    line = json.loads(out.decode().strip().splitlines()[-1])
    (transfer,) = line["transfers"]
    assert 0 < transfer["resumed"] < 8
    assert transfer["mirror_chunks"] == 8 - transfer["resumed"]
    assert transfer["requested"] == 0
    assert manifest.sha256 in installed_files(state)
