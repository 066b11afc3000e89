"""Blob serving to N boxes at once: MQTT chunks with 1 and 2 hub workers, an HTTP mirror (nginx),
and the two peers (raw broker, raw nginx), one run.

N devices fetch one target (default 100 MB, 4 MiB chunks) at the same time; aggregate bytes/s =
N x size / wall time until the last one holds the verified blob. In the same run, rounds
alternating the order:

  mirror      our transfer from nginx (Debian) on 127.0.0.1: range requests, every chunk checked
              against its signed hash and written to the partial file, then the whole file
              checked, fsynced and renamed into the store (no MQTT chunk: counted);
  mqtt-W      our transfer over MQTT chunks (window 8) from W hub worker processes
              (``python -m hub.sync.worker --role all --blob-workers W-1``, as ``edge-hub serve``)
              through Mosquitto with TLS;
  raw-broker  the same request/reply through the same Mosquitto, TLS and topics, answered from
              memory by a responder process (bench/mqtt_blob_peer.py): no verification, no disk
              (the peer of the MQTT path);
  raw-nginx   N concurrent aiohttp clients reading the same file with 4 MiB range GETs from the
              same nginx: no verification, no disk (the peer of the mirror path).

CPU seconds of each process group over each run (psutil, bench/proc_cpu.py) say which one was
the limit: the devices (this process), Mosquitto, nginx, the hub workers or the responder.

    .venv/bin/python bench/mirror_bench.py --devices 50 --size-mb 20 --rounds 2 --workers 1,2 --write
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
from fleet_sim import cpu_name

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


def start_hub(broker: object, repo_dir: Path, db: Path, log: Path, workers: int) -> subprocess.Popen[bytes]:
    """One ``--role all`` worker spawning ``workers - 1`` blob workers (``--blob-workers``, what
    ``edge-hub serve`` does on one host); returns once every one of them logged ``hub_serving``."""
    certdir = broker.certdir  # type: ignore[attr-defined]
    argv = ["-m", "hub.sync.worker", "--role", "all", "--repo", str(repo_dir), "--db", str(db)]
    argv += ["--host", "127.0.0.1", "--port", str(broker.service_port), "--ca", str(certdir / "ca.crt")]  # type: ignore[attr-defined]
    argv += ["--cert", str(certdir / "hub.crt"), "--key", str(certdir / "hub.key")]
    argv += ["--client-id", "bench-hub", "--blob-workers", str(workers - 1)]
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count("hub_serving") < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"hub workers not serving: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_peer(broker: object) -> subprocess.Popen[str]:
    """The raw-broker responder (bench/mqtt_blob_peer.py), once it is subscribed."""
    argv = [sys.executable, str(Path(__file__).with_name("mqtt_blob_peer.py"))]
    argv += ["--port", str(broker.service_port), "--certdir", str(broker.certdir)]  # type: ignore[attr-defined]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if line.strip() == "ready":
            return proc
        seen.append(line)
    proc.kill()
    raise RuntimeError(f"the raw broker peer did not start: {''.join(seen)[-2000:]}")


NAMES = {
    "mirror": "HTTP mirror (nginx), ours: range GETs, each 4 MiB chunk checked and written, whole file "
    "checked, fsynced, renamed",
    "raw-broker": "raw broker: MQTT request/reply of 4 MiB payloads (window 8) through the same Mosquitto "
    "and TLS, a responder process answering from memory, no checks, no disk (peer)",
    "raw-nginx": "raw nginx: aiohttp 4 MiB range GETs, no checks, no disk (peer)",
}


def name_of(what: str) -> str:
    if what.startswith("mqtt-"):
        w = int(what.split("-")[1])
        return f"MQTT chunks (window 8), ours, {w} hub worker process{'es' if w > 1 else ''}"
    return NAMES[what]


def main() -> int:
    parser = _report.bench_parser(__doc__, SECTION)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="hub worker counts for the MQTT path")
    args = parser.parse_args()

    import mqtt_blob_peer
    from proc_cpu import CpuMeter, describe, load_average

    from fleet import log as fleet_log
    from hub.sync.certs import make_test_pki
    from tests.sync.broker import CLIENTS, Broker, free_port
    from tests.sync.helpers import make_blob, new_repo, publish_model
    from tests.sync.mirror_server import Nginx, mirror_copy

    fleet_log.configure("warning", "console", stream=sys.stderr)
    ids = [f"bench-{i}" for i in range(args.devices)]
    workers = [int(w) for w in args.workers.split(",")]
    paths = ["raw-broker", "raw-nginx", "mirror", *(f"mqtt-{w}" for w in workers)]
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    results: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[tuple[float, dict[str, float]]]] = {k: [] for k in paths}
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
        hub = start_hub(broker, repo.path, work / "hub.db", work / "hub.log", 1)  # retained metadata
        stop_proc(hub)
        from agent.sync.fetcher import target_file
        from agent.sync.mirror import target_url

        url = target_url(nginx.url, target_file(manifest.target_path, manifest.sha256))
        try:
            for r in range(args.rounds):
                order = paths if r % 2 == 0 else paths[::-1]
                for what in order:
                    rdir = work / f"r{r}-{what}"
                    rdir.mkdir()
                    server: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None
                    if what == "raw-broker":
                        server = start_peer(broker)
                    elif what != "raw-nginx":
                        n = int(what.split("-")[1]) if what.startswith("mqtt-") else 1
                        server = start_hub(broker, repo.path, work / "hub.db", rdir / "hub.log", n)
                    groups = {
                        "devices": [os.getpid()],
                        "mosquitto": [broker.proc.pid],  # type: ignore[union-attr]
                        "nginx": [nginx.proc.pid],  # type: ignore[union-attr]
                        **({"hub or peer": [server.pid]} if server is not None else {}),
                    }
                    meter = CpuMeter(groups)
                    try:
                        meter.start()
                        if what == "raw-nginx":
                            asyncio.run(raw_nginx(url, size, args.devices))
                        elif what == "raw-broker":
                            asyncio.run(mqtt_blob_peer.fetch_all(broker, ids, size, CHUNK, 8))
                        else:
                            mirror = nginx.url if what == "mirror" else None
                            asyncio.run(devices_fetch(broker, repo.path, rdir, ids, mirror))
                        t, used = meter.stop()
                    finally:
                        if server is not None:
                            stop_proc(server)  # type: ignore[arg-type]
                    results[what].append(t)
                    cpu[what].append((t, used))
                    mbs = args.devices * size / 1e6 / t
                    print(f"round {r} {what}: {t:.2f} s, {mbs:.0f} MB/s aggregate; cpu: {describe(t, used)}",
                          flush=True)  # fmt: skip
        finally:
            nginx.stop()
            broker.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = load_average()

    from statistics import median

    total = args.devices * size / 1e6
    rate = {k: total / median(v) for k, v in results.items()}
    env = (
        f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        "nginx and Mosquitto (TLS, client certificates) from Debian on 127.0.0.1, the devices in one "
        f"process, the hub worker(s) in others; medians of {args.rounds} rounds in alternating order; "
        f"load average at the end {load}; "
        "the machine was shared with other work"
    )
    cols = ["devices", "mosquitto", "nginx", "hub or peer"]
    rows = [
        "| path | aggregate | per device | vs raw broker | vs raw nginx | "
        + " | ".join(f"{c} (cores)" for c in cols)
        + " |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(cols),
    ]
    for k in ["mirror", *(f"mqtt-{w}" for w in workers), "raw-broker", "raw-nginx"]:
        t, used = sorted(cpu[k])[len(cpu[k]) // 2]
        cores = " | ".join(f"{used[c] / t:.2f}" if c in used else "-" for c in cols)
        rows.append(
            f"| {name_of(k)} | {rate[k]:.0f} MB/s | {rate[k] / args.devices:.1f} MB/s "
            f"| {rate[k] / rate['raw-broker']:.2f} | {rate[k] / rate['raw-nginx']:.2f} | {cores} |"
        )
    mqtt = [f"mqtt-{w}" for w in workers]
    scaling = ""
    if len(mqtt) > 1:
        scaling = f" MQTT {workers[-1]} workers vs 1: **{rate[mqtt[-1]] / rate[mqtt[0]]:.2f}x**."
    text = (
        f"{SECTION}\n\nReproduce: `.venv/bin/python bench/mirror_bench.py --devices {args.devices} "
        f"--size-mb {args.size_mb} --rounds {args.rounds} --workers {args.workers} --write` ({env}).\n\n"
        f"{args.devices} devices fetch one {args.size_mb} MB target at the same time (CPU: each group's "
        "CPU seconds over the run's wall time, psutil, of the median run; of an even count, the slower "
        "middle run).\n\n"
        + "\n".join(rows)
        + f"\n\nMirror vs MQTT (1 worker): **{rate['mirror'] / rate[mqtt[0]]:.2f}x**.{scaling}\n"
    )
    _report.report(SECTION, text, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
