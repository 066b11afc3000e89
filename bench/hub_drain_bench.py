"""Hub audit ingest in isolation: a backlog of audit batches queued at the broker, drained by the hub.

The fleet simulator's audit phase (bench/fleet_sim.py) measures boxes and hub together on the same
cores: the simulator's own publishing bounds the pace. Here the hub's ingest is timed alone:

1. N simulated boxes (tests/fleetsim/, one TLS connection and certificate each) connect once to a
   real Mosquitto and seal RECORDS signed records each (once: every run replays the same chains
   into a fresh database, the boxes' keys registered there as ``edge-hub device register`` does).
2. Per run: ``edge-hub serve`` worker(s) start on the run's database and subscribe (their shared
   subscription ``$share/hub/.../audit`` exists), then are frozen with SIGSTOP; every box publishes
   its whole backlog (QoS 1, acknowledged by the broker: the batches are queued at the broker for
   the workers' sessions); the simulator then publishes nothing more.
3. The clock starts at SIGCONT and stops when every box holds the hub's ack for its last record;
   every record is then counted in the hub's database (exactly once). No box re-sends: the boxes'
   own ack timeout plays no part (nothing is sent again), and the frozen interval stays under the
   workers' keepalive (1.5 x 30 s) so no session is dropped.
4. CPU seconds used during the drain by the hub workers, Mosquitto, PostgreSQL (the postmaster and
   its backends) and the simulator (receiving acks) are read with psutil (bench/proc_cpu.py), for
   each worker on its own.

``--worker-cpu FRACTION`` emulates workers on separate hosts, each with FRACTION of a core: every
worker process is put, right after it starts, in a cgroup of its own with that CPU quota
(bench/cpu_quota.py; needs root and a writable cgroup cpu controller, refused otherwise), removed
after the run. PostgreSQL, Mosquitto and the simulator share the rest of the machine unconstrained.
The result goes to a section of its own, after the unconstrained one.

The broker runs the shipped mosquitto.conf with one change, said in the output: the per-session
queue caps (``max_queued_messages 10000``, ``max_queued_bytes 64 MiB``) are lifted, so a single
worker's session can hold the whole backlog (otherwise the broker drops what exceeds 64 MiB and
the measurement is of drops and re-sends; docs/operations.md 4.9). Rounds alternate the setups;
medians.

    .venv/bin/python bench/hub_drain_bench.py --boxes 1000 --records 200 --rounds 2 --write
    .venv/bin/python bench/hub_drain_bench.py --boxes 1000 --records 1000 --rounds 3 \
        --setups pg-1,pg-2 --worker-cpu 0.4 --write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _report
from cpu_quota import QuotaGroups, find_layout, quota_groups, quota_us
from fleet_sim import broker_drops, cpu_name, raise_fd_limit
from proc_cpu import CpuMeter, describe, load_average

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Hub audit ingest, drained from the broker"
SECTION_QUOTA = "## Hub audit ingest, workers as separate hosts (CPU quota per worker)"
DEFAULT_SETUPS = "sqlite-1,pg-1,pg-2"
KEEPALIVE_GRACE_S = 40.0
"""the longest the workers stay frozen: under 1.5 x the hub's 30 s keepalive"""


def unlimited_queue_source(dest: Path) -> Path:
    """A copy of the shipped mosquitto/ directory whose per-session queue caps are lifted (0)."""
    src = ROOT / "mosquitto"
    shutil.copytree(src, dest)
    conf = dest / "mosquitto.conf"
    lines = conf.read_text().splitlines()
    changed = 0
    for i, line in enumerate(lines):
        if line.startswith(("max_queued_messages ", "max_queued_bytes ")):
            lines[i] = line.split()[0] + " 0"
            changed += 1
    if changed != 2:
        raise RuntimeError(f"{conf}: expected max_queued_messages and max_queued_bytes, changed {changed}")
    conf.write_text("\n".join(lines) + "\n")
    return dest


@dataclass
class Run:
    setup: str
    seconds: float
    records: int
    publish_s: float
    frozen_s: float
    cpu: dict[str, float]
    drops: int
    batches: int
    throttled: list[float] = field(default_factory=list)
    """per worker under a quota: the share of the drain's CFS periods in which it was throttled"""

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def workers(self) -> list[float]:
        """CPU seconds of each worker (with its children), in worker order."""
        return [v for k, v in sorted(self.cpu.items()) if k.startswith("worker ")]

    def cores(self, group: str) -> float | None:
        """Cores busy over the drain: a group of ``cpu``, or "hub workers" (all workers)."""
        if group == "hub workers":
            return sum(self.workers) / self.seconds
        return self.cpu[group] / self.seconds if group in self.cpu else None


def postmaster_pid(pg: Any) -> int:
    return int((pg.data / "postmaster.pid").read_text().splitlines()[0])


def throttled_share(before: dict[str, int], after: dict[str, int]) -> float:
    """The share of CFS periods between two ``cpu.stat`` readings in which the group was throttled."""
    periods = after["nr_periods"] - before["nr_periods"]
    return (after["nr_throttled"] - before["nr_throttled"]) / periods if periods else 0.0


def quotas(worker_cpu: float | None) -> AbstractContextManager[QuotaGroups | None]:
    """A cgroup per worker with ``worker_cpu`` of a core for one run, or none."""
    return quota_groups(worker_cpu, f"hub-drain-{os.getpid()}") if worker_cpu else nullcontext()


async def drain(
    setup: str,
    r: int,
    fleet: Any,
    broker: Any,
    pg: Any,
    repo: Path,
    pki: Path,
    work: Path,
    groups: QuotaGroups | None,
    states: int = 0,
) -> Run:
    """One drain; of audit batches, or with ``states`` of that many state reports per box (each
    worker reads every report: plain subscription), done when every box's last is stored."""
    from hub.sync.store import HubStore
    from tests.fleetsim.fleet import HubProcess
    from tests.sync.hub_workers import wait_serving

    kind, workers = setup.rsplit("-", 1)
    run_dir = work / f"r{r}-{setup}"
    run_dir.mkdir()
    db: str | Path = run_dir / "hub.db" if kind == "sqlite" else pg.new_database()
    HubStore(db).close()  # the schema, made once before the workers race for it
    fleet.register_keys(db)
    hubs = []
    try:
        for i in range(int(workers)):
            (run_dir / f"w{i}").mkdir()
            hub = HubProcess(
                repo, db, run_dir / f"w{i}", "127.0.0.1", broker.service_port, pki,
                rollout_interval_s=60.0, client_id=f"hub-drain-{i}",
            )  # fmt: skip
            hubs.append(hub)  # before start: stopped in the finally whatever happens next
            hub.start()
            if groups is not None:  # before it serves: the drain runs wholly under the quota
                assert hub.proc is not None
                groups.place(f"w{i}", hub.proc.pid)
        for hub in hubs:
            await asyncio.to_thread(wait_serving, hub.proc, hub.work / "hub.log")
        await asyncio.sleep(1.0)  # settle: retained metadata delivered, presence published
        for b in fleet.boxes:
            b.uploaded = 0
            b.stats.audit_acked = 0
            b.stats.audit_done_at = None
            b._audit_ack.clear()
        drops_before = broker_drops(broker)
        total = sum(len(b.records) for b in fleet.boxes)
        batches = [(b, m) for b in fleet.boxes for m in b.audit_batches()]
        if states:
            total, batches = len(fleet.boxes) * states, []
        for hub in hubs:
            os.kill(hub.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            if states:
                for k in range(states):
                    await asyncio.gather(
                        *(b.publish_state(force=True, at=STATE_MARK + k) for b in fleet.boxes)
                    )
            else:
                await asyncio.gather(*(b.client.publish(m, timeout=60.0) for b, m in batches))
            publish_s = time.monotonic() - frozen
            await asyncio.sleep(1.0)  # the broker has them (PUBACK); let it finish queueing
            frozen_s = time.monotonic() - frozen
            if frozen_s > KEEPALIVE_GRACE_S:
                print(f"  warning: workers frozen {frozen_s:.0f} s (keepalive may drop them)", flush=True)
            measured = {
                **{f"worker {i}": [h.proc.pid] for i, h in enumerate(hubs)},
                "mosquitto": [broker.proc.pid],
                **({"postgresql": [postmaster_pid(pg)]} if kind == "pg" else {}),
                "simulator": [os.getpid()],
            }
            meter = CpuMeter(measured)
            meter.start()
            stats = [groups.stat(f"w{i}") for i in range(len(hubs))] if groups is not None else []
        finally:
            for hub in hubs:
                os.kill(hub.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 300
        if states:
            await last_states_stored(db, len(fleet.boxes), STATE_MARK + states - 1, deadline)
        while not states and any(b.uploaded < len(b.records) for b in fleet.boxes):
            if time.monotonic() > deadline:
                left = sum(b.uploaded < len(b.records) for b in fleet.boxes)
                raise TimeoutError(f"{setup}: {left} boxes not acknowledged after 300 s")
            await asyncio.sleep(0.01)
        wall, cpu = meter.stop()
        after = [groups.stat(f"w{i}") for i in range(len(stats))] if groups is not None else []
        throttled = [throttled_share(b, a) for b, a in zip(stats, after, strict=True)]
    finally:
        for hub in hubs:
            hub.stop()
    if states:
        run = Run(setup, wall, total, publish_s, frozen_s, cpu, broker_drops(broker) - drops_before, 0, [])
        print(
            f"round {r} {setup}: {run.rate:,.0f} state reports/s ({wall:.2f} s; {total} published in "
            f"{publish_s:.1f} s); cpu: {describe(wall, cpu)}; load {load_average()}",
            flush=True,
        )
        return run
    refused = [x for b in fleet.boxes for x in b.stats.refusals if x.startswith("audit")]
    if refused:
        raise RuntimeError(f"{setup}: {len(refused)} audit refusals, e.g. {refused[:3]}")
    store = HubStore(db)
    try:
        rows = store.db.query("SELECT COUNT(*), COUNT(DISTINCT device || ':' || seq) FROM audit", ())
    finally:
        store.close()
    stored, distinct = (int(x) for x in rows[0])
    if stored != total or distinct != total:
        raise RuntimeError(f"{setup}: {total} records sent, {stored} stored ({distinct} distinct)")
    run = Run(
        setup, wall, total, publish_s, frozen_s, cpu, broker_drops(broker) - drops_before, len(batches),
        throttled,
    )  # fmt: skip
    held = f"; throttled in {', '.join(f'{x:.0%}' for x in throttled)} of periods" if throttled else ""
    print(
        f"round {r} {setup}: {run.rate:,.0f} records/s ({wall:.2f} s; {len(batches)} batches published "
        f"in {publish_s:.1f} s); cpu: {describe(wall, cpu)}{held}; load {load_average()}",
        flush=True,
    )
    return run


STATE_MARK = 1_000_000.0
"""``last_sync`` of the first state report of a state drain (the last is ``STATE_MARK + states - 1``)."""


async def last_states_stored(db: str | Path, boxes: int, last: float, deadline: float) -> None:
    """Until every box's stored state is its last report (one cheap query per poll)."""
    from hub.sync.store import HubStore

    store = HubStore(db)
    pattern = f'%"last_sync":{last!r},%'
    try:
        while True:
            rows = await asyncio.to_thread(
                store.db.query, "SELECT COUNT(*) FROM devices WHERE state LIKE ?", (pattern,)
            )
            if int(rows[0][0]) == boxes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{int(rows[0][0])} of {boxes} boxes' last state stored after 300 s")
            await asyncio.sleep(0.05)
    finally:
        store.close()


async def main_async(args: argparse.Namespace, work: Path) -> list[Run]:
    from fleet.mqtt import MqttConfig
    from tests.fleetsim.fleet import SimFleet
    from tests.fleetsim.pki import device_ids, fleet_pki
    from tests.hub.postgres import Postgres
    from tests.sync.broker import Broker, free_port, plugin_path
    from tests.sync.helpers import new_repo

    setups = args.setups.split(",")
    for s in setups:
        if s not in ("sqlite-1", "pg-1", "pg-2"):
            raise SystemExit(f"unknown setup {s!r}: expected sqlite-1, pg-1 or pg-2")
    pki = fleet_pki(args.boxes)
    broker = Broker(work / "broker", pki, free_port())
    broker.workdir.mkdir()
    from hub.sync.broker import install

    source = unlimited_queue_source(work / "mosquitto-src")
    broker.layout = install(
        source, pki, Path(tempfile.mkdtemp(prefix="edge-broker-")),
        port=broker.port, service_port=broker.service_port, plugin=plugin_path(),
    )  # fmt: skip
    broker.start()
    repo = new_repo(work / "repo")
    pg = None
    if any(s.startswith("pg") for s in setups):
        pg = Postgres(fsync=True)
        pg.start()

    def config(d: str) -> MqttConfig:
        return replace(broker.client_config(d), backoff_min_s=0.5, backoff_max_s=5.0, ack_timeout_s=60.0)

    root = (repo.path / "metadata" / "1.root.json").read_bytes()
    fleet = SimFleet(device_ids(args.boxes), config, root)
    runs: list[Run] = []
    try:
        t = time.monotonic()
        await fleet.start(timeout=300)
        print(f"{args.boxes} boxes connected in {time.monotonic() - t:.1f} s", flush=True)
        t = time.monotonic()
        for b in fleet.boxes:
            b.add_audit(args.records)
        print(f"sealed {args.boxes * args.records} records in {time.monotonic() - t:.1f} s", flush=True)
        for r in range(args.rounds):
            order = setups if r % 2 == 0 else setups[::-1]
            for setup in order:
                with quotas(args.worker_cpu) as groups:
                    runs.append(
                        await drain(setup, r, fleet, broker, pg, repo.path, pki, work, groups, args.states)
                    )
        connects = sum(b.stats.connects for b in fleet.boxes)
        if connects != args.boxes:
            print(f"note: {connects - args.boxes} box reconnects during the runs", flush=True)
    finally:
        await fleet.close()
        broker.cleanup()
        if pg is not None:
            pg.stop()
    return runs


def render(args: argparse.Namespace, runs: list[Run], load: str) -> str:
    by: dict[str, list[Run]] = {}
    for run in runs:
        by.setdefault(run.setup, []).append(run)
    med = {k: statistics.median(r.rate for r in v) for k, v in by.items()}
    quota = args.worker_cpu
    names = {"sqlite-1": "1 worker, SQLite", "pg-1": "1 worker, PostgreSQL", "pg-2": "2 workers, PostgreSQL"}
    groups = ["hub workers", "mosquitto", "postgresql", "simulator"]
    cols = " | ".join(f"{g} (cores)" for g in groups)
    extra = " worker quota (cores) | each worker (cores) | throttled periods |" if quota else ""
    head = f"| setup | records/s (median) | runs |{extra} {cols} | total cores |"
    rows = [head, "|---|---:|---|" + "---:|" * (len(groups) + 1 + (3 if quota else 0))]
    for k, v in by.items():
        mid = sorted(v, key=lambda x: x.rate)[len(v) // 2]
        cores = [mid.cores(g) for g in groups]
        each = ""
        if quota:
            per = " / ".join(f"{w / mid.seconds:.2f}" for w in mid.workers)
            throttled = " / ".join(f"{t:.0%}" for t in mid.throttled)
            each = f" {quota:.2f} | {per} | {throttled} |"
        rows.append(
            f"| {names[k]} | {med[k]:,.0f} | {', '.join(f'{x.rate:,.0f}' for x in v)} |{each} "
            + " | ".join("-" if c is None else f"{c:.2f}" for c in cores)
            + f" | {sum(c or 0.0 for c in cores):.2f} |"
        )
    ratios = []
    if "pg-1" in med and "pg-2" in med:
        two = med["pg-2"] / med["pg-1"]
        ratios.append(f"2 workers / 1 worker on PostgreSQL: **{two:.2f}x** (goal >= 1.6x)")
    if "pg-1" in med and "sqlite-1" in med:
        ratios.append(f"PostgreSQL / SQLite, 1 worker: {med['pg-1'] / med['sqlite-1']:.2f}x")
    drops = sum(r.drops for r in runs)
    frozen = max(r.frozen_s for r in runs)
    publish = statistics.median(r.publish_s for r in runs)
    command = (
        f".venv/bin/python bench/hub_drain_bench.py --boxes {args.boxes} --records {args.records} "
        f"--rounds {args.rounds}"
        + (f" --setups {args.setups}" if args.setups != DEFAULT_SETUPS else "")
        + (f" --worker-cpu {quota}" if quota else "")
        + " --write"
    )
    emulation = ""
    if quota:
        emulation = f"""
**Workers as separate hosts.** Each `edge-hub serve` worker runs in a cgroup of its own with a CPU
quota of {quota} of one core ({quota_us(quota)} us per 100 ms period, bench/cpu_quota.py, cgroup
v{find_layout().version}): this emulates workers on separate hosts, each with {quota} of a core, while
PostgreSQL, Mosquitto and the simulator share the rest of the machine, unconstrained. While the
total cores busy stay under the machine's, the ratio shows the design's scaling rather than the
machine's limit. "each worker" is the CPU each worker process used over the drain; "throttled
periods" the share of its 100 ms periods in which it used up its quota (cpu.stat). The unconstrained
figures are in the section before.
"""
    return f"""{SECTION_QUOTA if quota else SECTION}

    {command}
{emulation}
{args.boxes} simulated boxes x {args.records} sealed, signed records ({runs[0].batches} batches of at most
1,000, each signed at its last record, as the device sends them; published in {publish:.1f} s, median)
queued at the broker while the hub workers are frozen (SIGSTOP), then drained: the clock runs from SIGCONT
to every box holding the ack for its last record; every record counted in the hub's database
afterwards (exactly once). Real Mosquitto (TLS, client certificates, the shipped config with the
per-session queue caps lifted so one session holds the whole backlog), `edge-hub serve` processes,
a private PostgreSQL cluster (fsync and `synchronous_commit` on). {args.rounds} rounds alternating the
setups; medians; CPU of each process over the drain (psutil), as cores busy, of the median run
(of an even count, the faster of the two middle runs).
CPU {cpu_name()}, {os.cpu_count()} cores shared with other work; load average at the end {load}.

{chr(10).join(rows)}

{"; ".join(ratios)}. Broker drops for hub sessions: {drops}; no box re-sent (the backlog was published
once); longest frozen interval {frozen:.0f} s (under the 45 s keepalive limit).
"""


def main() -> int:
    parser = _report.bench_parser(__doc__, SECTION)
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--records", type=int, default=200, help="per box")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setups", default=DEFAULT_SETUPS)
    parser.add_argument(
        "--worker-cpu", type=float, default=None, metavar="FRACTION",
        help="each worker in a cgroup of its own with FRACTION of one core (workers as separate "
        f"hosts); --write then replaces '{SECTION_QUOTA}'",
    )  # fmt: skip
    parser.add_argument(
        "--states", type=int, default=0, metavar="N",
        help="drain N state reports per box instead of audit batches (printed only, no --write)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.states and args.write:
        parser.error("--states: the state drain is printed only (no --write)")
    if args.states < 0:
        parser.error("--states: must be 0 or more")
    if args.worker_cpu is not None:
        try:  # refused before the fleet is set up, not after
            quota_us(args.worker_cpu)
            find_layout()
        except (ValueError, RuntimeError) as e:
            parser.error(f"--worker-cpu: {e}")
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="hub-drain-"))
    try:
        runs = asyncio.run(main_async(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.states:
        by: dict[str, list[float]] = {}
        for run in runs:
            by.setdefault(run.setup, []).append(run.rate)
        for setup, rates in by.items():
            print(f"{setup}: median {statistics.median(rates):,.0f} state reports/s over {len(rates)} runs")
        return 0
    if args.worker_cpu:
        _report.report(SECTION_QUOTA, render(args, runs, load_average()), write=args.write, after=SECTION)
    else:
        _report.report(SECTION, render(args, runs, load_average()), write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
