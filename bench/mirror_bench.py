"""Blob serving to N boxes at once: an HTTP mirror (nginx) vs MQTT chunks, and raw nginx, one run.

N devices fetch one target (default 100 MB, 4 MiB chunks) at the same time; aggregate bytes/s =
N x size / wall time until the last one holds the verified blob. In the same run, rounds
alternating:

  mirror    our transfer from nginx (Debian) on 127.0.0.1: range requests, every chunk checked
            against its signed hash and written to the partial file, then the whole file checked,
            fsynced and renamed into the store (no MQTT chunk: counted);
  mqtt      our transfer over MQTT chunks (window 8) from one hub worker process
            (``python -m hub.sync.worker --role all``) through Mosquitto with TLS;
  raw nginx N concurrent aiohttp clients reading the same file with 4 MiB range GETs from the same
            nginx: no verification, no disk (the peer).

    .venv/bin/python bench/mirror_bench.py --devices 4 --size-mb 100 --rounds 2 --write
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # bench/_report.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Mirrors"
MiB = 1 << 20
CHUNK = 4 << 20


async def devices_fetch(
    broker: object, repo_dir: Path, work: Path, ids: list[str], mirror: str | None
) -> float:
    from agent.sync.fetcher import MqttFetcher
    from tests.sync.helpers import enrolled_device, running_device

    for d in ids:
        enrolled_device(work / d, repo_dir, d)
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        devs = [
            await stack.enter_async_context(
                running_device(broker, work / d, d, window=8, mirrors=(mirror,) if mirror else ())  # type: ignore[arg-type]
            )
            for d in ids
        ]
        start = time.perf_counter()
        await asyncio.gather(*(dev.update() for dev in devs))
        elapsed = time.perf_counter() - start
        fetchers: list[MqttFetcher] = [dev.fetcher for dev in devs]
        requested = sum(sum(t.requested.values()) for f in fetchers for t in f.transfers)
        if mirror and requested:
            raise RuntimeError(f"{requested} chunks went over MQTT with a good mirror")
    for d in ids:
        shutil.rmtree(work / d)
    return elapsed


async def raw_nginx(url: str, size: int, n: int) -> float:
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> int:
        got = 0
        for start in range(0, size, CHUNK):
            end = min(size, start + CHUNK) - 1
            async with session.get(url, headers={"Range": f"bytes={start}-{end}"}) as resp:
                assert resp.status == 206
                got += len(await resp.read())
        return got

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one(session) for _ in range(n)))
        elapsed = time.perf_counter() - t0
    assert all(g == size for g in got)
    return elapsed


def start_hub(broker: object, repo_dir: Path, work: Path) -> subprocess.Popen[bytes]:
    certdir = broker.certdir  # type: ignore[attr-defined]
    argv = ["-m", "hub.sync.worker", "--role", "all", "--repo", str(repo_dir), "--db", str(work / "hub.db")]
    argv += ["--host", "127.0.0.1", "--port", str(broker.service_port), "--ca", str(certdir / "ca.crt")]  # type: ignore[attr-defined]
    argv += ["--cert", str(certdir / "hub.crt"), "--key", str(certdir / "hub.key")]
    argv += ["--client-id", "bench-hub"]
    quiet = subprocess.DEVNULL
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=quiet, stderr=quiet)


def main() -> int:
    parser = _report.bench_parser(__doc__, SECTION)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from fleet import log as fleet_log
    from hub.sync.certs import make_test_pki
    from tests.sync.broker import CLIENTS, Broker, free_port
    from tests.sync.helpers import make_blob, new_repo, publish_model
    from tests.sync.mirror_server import Nginx, mirror_copy

    fleet_log.configure("warning", "console", stream=sys.stderr)
    ids = [f"bench-{i}" for i in range(args.devices)]
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    results: dict[str, list[float]] = {"mirror": [], "mqtt": [], "raw": []}
    try:
        make_test_pki(work / "pki", (*CLIENTS, *ids))
        (work / "broker").mkdir()
        broker = Broker(work / "broker", work / "pki", free_port())
        broker.start()
        size = args.size_mb * 1_000_000
        repo = new_repo(work / "repo")
        manifest = publish_model(repo, make_blob(work / "big.gguf", size), "big", chunk_size=CHUNK)
        (work / "big.gguf").unlink()
        nginx = Nginx(work / "nginx", work / "www")
        mirror_copy(repo.path, nginx.root)
        nginx.start()
        hub = start_hub(broker, repo.path, work)
        time.sleep(3.0)  # the hub process is up and subscribed
        from agent.sync.fetcher import target_file
        from agent.sync.mirror import target_url

        url = target_url(nginx.url, target_file(manifest.target_path, manifest.sha256))
        try:
            for r in range(args.rounds):
                order = ["raw", "mirror", "mqtt"] if r % 2 == 0 else ["mqtt", "mirror", "raw"]
                for what in order:
                    rdir = work / f"r{r}-{what}"
                    rdir.mkdir()
                    if what == "raw":
                        t = asyncio.run(raw_nginx(url, size, args.devices))
                    else:
                        mirror = nginx.url if what == "mirror" else None
                        t = asyncio.run(devices_fetch(broker, repo.path, rdir, ids, mirror))
                    results[what].append(t)
                    mbs = args.devices * size / 1e6 / t
                    print(f"round {r} {what}: {t:.2f} s, {mbs:.0f} MB/s aggregate", flush=True)
        finally:
            hub.terminate()
            hub.wait(30)
            nginx.stop()
            broker.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    total = args.devices * size / 1e6
    rate = {k: total / median(v) for k, v in results.items()}
    env = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        "nginx and Mosquitto "
        "(TLS, client certificates) from Debian on 127.0.0.1, the devices in one process, the hub worker in "
        f"another; medians of {args.rounds} rounds in alternating order; "
        "the machine was shared with other work"
    )
    rows = [
        "| path | aggregate | per device | vs raw nginx |",
        "| --- | --- | --- | --- |",
        f"| HTTP mirror (nginx), ours: range GETs, each 4 MiB chunk checked and written, whole file checked, "
        f"fsynced, renamed | {rate['mirror']:.0f} MB/s | {rate['mirror'] / args.devices:.0f} MB/s "
        f"| {rate['mirror'] / rate['raw']:.2f} |",
        f"| MQTT chunks (window 8), one hub worker process, ours | {rate['mqtt']:.0f} MB/s "
        f"| {rate['mqtt'] / args.devices:.0f} MB/s | {rate['mqtt'] / rate['raw']:.2f} |",
        f"| raw nginx: aiohttp 4 MiB range GETs, no checks, no disk (peer) | {rate['raw']:.0f} MB/s "
        f"| {rate['raw'] / args.devices:.0f} MB/s | 1.00 |",
    ]
    text = (
        f"{SECTION}\n\nReproduce: `.venv/bin/python bench/mirror_bench.py --devices {args.devices} "
        f"--size-mb {args.size_mb} --rounds {args.rounds} --write` ({env}).\n\n"
        f"{args.devices} devices fetch one {args.size_mb} MB target at the same time.\n\n"
        + "\n".join(rows)
        + f"\n\nMirror vs MQTT: **{rate['mirror'] / rate['mqtt']:.2f}x**. "
        "The mirror path moves the bytes with "
        "no hub and no broker in the way (nginx sendfile); MQTT carries each chunk through the broker "
        "twice (request/reply) and through the hub worker's Python. Both verify every chunk the same way.\n"
    )
    _report.report(SECTION, text, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
