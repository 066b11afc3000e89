"""Hub audit ingest: records/s stored by 1 ``edge-hub serve`` on SQLite, 1 on PostgreSQL and 2 on
PostgreSQL (sharing the devices' batches through the broker's shared subscription), one real
Mosquitto (TLS, client certificates), a private PostgreSQL cluster (fsync on), real signed chains.

Each run: ``--devices`` devices (device certificates of the test PKI) with ``--records`` records
each pre-written to their audit logs while offline; the hub workers start; the clock runs from the
devices' uploaders starting (batches of 1000, window 4, as the agent) to every record acknowledged;
then every chain is re-verified and counted (exactly once). Rounds alternate the setups; medians.

    PYTHONPATH=. .venv/bin/python bench/hub_bench.py --rounds 3 [--records 20000] [--devices 16]
        [--setups sqlite-1,pg-1,pg-2]

Each run prints the CPU the hub workers and the devices' process used over its time (cores busy):
below one core each, the run is bound by latency or by the machine's other load, not by the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def one_run(
    broker: object, url_or_path: str | Path, workers: int, records: int, work: Path, devices: tuple[str, ...]
) -> float:
    from agent.audit import AuditLog, Entry
    from agent.sync.audit_upload import AuditUploader
    from fleet.device_key import DeviceKey
    from fleet.mqtt import MqttClient
    from hub.sync.store import HubStore
    from tests.sync.helpers import new_repo
    from tests.sync.hub_workers import spawn_hub, stop, wait_serving

    work.mkdir(parents=True)
    store = HubStore(url_or_path)
    logs = {}
    for d in devices:
        key = DeviceKey.generate()
        store.register_key(d, key.public.raw.hex())
        log = AuditLog(work / f"{d}.db", key=key, max_bytes=1 << 30)
        log.start()
        for f in [
            log.submit(Entry("request", "m", "allow", "bench", {"uid": 1}, {"i": i})) for i in range(records)
        ]:
            f.result(120)
        logs[d] = (log, key)
    repo = new_repo(work / "repo")
    hubs: list[subprocess.Popen[bytes]] = []
    for i in range(workers):
        hubs.append(
            spawn_hub(broker, repo.path, url_or_path, f"bench-hub-{work.name}-{i}", work / f"hub{i}.log")
        )  # type: ignore[arg-type]
        await asyncio.to_thread(wait_serving, hubs[-1], work / f"hub{i}.log")
    startup_cpu = [_cpu_s(h.pid) for h in hubs]  # imports, migrations, subscribing: not ingest
    clients, ups = [], []
    for d in devices:
        c = MqttClient(broker.client_config(d, client_id=f"{d}-{work.name}"))  # type: ignore[attr-defined]
        await c.start()
        await c.wait_connected(10)
        clients.append(c)
        ups.append(AuditUploader(c, logs[d][0], d, logs[d][1].public.raw.hex(), batch_size=1000, window=4))
    start, own_cpu = time.perf_counter(), time.process_time()
    for u in ups:
        await u.start()
    while any(logs[d][0].backlog() for d in devices):
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    hub_cpu = sum(_cpu_s(h.pid) for h in hubs) - sum(startup_cpu)
    own_cpu = time.process_time() - own_cpu
    for u in ups:
        await u.close()
    for c in clients:
        await c.close()
    for h in hubs:
        stop(h)
    for d in devices:
        logs[d][0].close()
        assert store.audit_count(d) == (records, records), d
        assert store.verify_device(d) == (records, []), d
    store.close()
    n = len(devices) * records
    print(
        f"    {elapsed:.2f} s; cores busy: hub workers {hub_cpu / elapsed:.2f}, "
        f"the devices' process {own_cpu / elapsed:.2f}",
        flush=True,
    )
    return n / elapsed


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(args: argparse.Namespace) -> None:
    if args.devices < 1:
        raise SystemExit("--devices must be at least 1")
    devices = tuple(f"dev-{i:03d}" for i in range(args.devices))
    from hub.sync.certs import make_test_pki
    from tests.hub.postgres import Postgres
    from tests.sync.broker import CLIENTS, Broker, free_port

    tmp = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    make_test_pki(tmp / "pki", (*CLIENTS, *devices))
    broker = Broker(tmp / "broker", tmp / "pki", free_port())
    broker.workdir.mkdir()
    broker.start()
    pg = Postgres(fsync=True)
    pg.start()
    results: dict[str, list[float]] = {k: [] for k in args.setups.split(",")}
    try:
        for r in range(args.rounds):
            for name, rates in results.items():
                target: str | Path = (
                    tmp / f"r{r}-{name}.db" if name.startswith("sqlite") else pg.new_database()
                )
                work = tmp / f"r{r}-{name}"
                rate = await one_run(broker, target, int(name[-1]), args.records, work, devices)
                rates.append(rate)
                print(f"round {r} {name}: {rate:,.0f} records/s", flush=True)
    finally:
        print(f"work directory: {tmp}", flush=True)
        broker.cleanup()
        pg.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    cpu = platform.processor()
    with open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), cpu)
    print(f"\nCPU: {cpu}, {args.rounds} rounds, {len(devices)} devices x {args.records} records, medians:")
    for k, v in med.items():
        print(f"  {k}: {v:,.0f} records/s")
    if "pg-2" in med and "pg-1" in med:
        print(f"  pg-2 / pg-1 = {med['pg-2'] / med['pg-1']:.2f}x")
    if "pg-1" in med and "sqlite-1" in med:
        print(f"  pg-1 / sqlite-1 = {med['pg-1'] / med['sqlite-1']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records", type=int, default=5000, help="per device")
    p.add_argument("--devices", type=int, default=4, help="devices uploading at once (one process)")
    p.add_argument("--setups", default="sqlite-1,pg-1,pg-2", help="comma-separated subset")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
