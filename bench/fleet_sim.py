"""The hub under a simulated fleet: N boxes in one process (tests/fleetsim/), a real Mosquitto
(shipped config and plugin, TLS, one certificate per box) and real ``edge-hub serve`` processes.
One run, in this order:

  connect    the connect storm: every box starts at once; seconds until all are connected, and
             until the hub's inventory holds every box's state (hardware, health, serving v1);
  state      every box sends STATES state reports; reports/s until the hub stored each box's last;
  events     every box sends EVENTS events; events/s until every one is acknowledged (stored);
  audit      every box uploads RECORDS sealed, signed records (batches of 1,000); records/s until
             every box holds the hub's ack for its last record (chains checked by the hub);
  metadata   ``edge-hub deploy`` (a separate process) of v2 to the group; seconds until every box
             verified the new metadata, fetched the deployment by chunk request and took it;
  rollout    ``edge-hub rollout start --waves 1%,10%,50%,100%`` v2 -> v3; seconds until every box
             serves v3 (issue 18's measure) and until the hub marks the rollout completed.

    .venv/bin/python bench/fleet_sim.py --boxes 1000 --write   # replaces "## Fleet simulator"
    .venv/bin/python bench/fleet_sim.py --boxes 1000 --db postgresql://... --workers 2

  faults     with ``--fault``: the audit phase only (after the connect storm), with one fault
             once FAULT_AT of the records are acknowledged: ``kill-worker`` (SIGKILL to the last
             worker; started again after ``--restart-after`` s if given), ``stop-worker`` (SIGTERM
             to it, the same otherwise), ``pg-restart``
             (``pg_ctl restart -m fast``) or ``broker-restart`` (Mosquitto stopped and started
             again); then each box's sealed records are compared with what the hub stored
             (lost, duplicated, altered) and the hub re-verifies every stored chain.

    .venv/bin/python bench/fleet_sim.py --boxes 1000 --postgres --workers 2 --fault kill-worker

``--postgres`` starts a private PostgreSQL cluster (tests/hub/postgres.py, fsync on) for the run;
``--db`` is handed to ``edge-hub serve --db`` (a SQLite path by default; whatever the hub accepts);
``--workers N`` runs N ``edge-hub serve`` processes sharing that database and the broker's shared
subscriptions (on SQLite, one is what main supports). The open-file limit is raised to its hard
limit first (every box is a socket here and in the broker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Fleet simulator"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_name() -> str:
    try:
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def broker_drops(broker: object) -> int:
    """How often Mosquitto logged dropping messages queued for a hub client (its per-session
    ``max_queued_messages`` / ``max_queued_bytes`` caps in the shipped config)."""
    log = broker.log_path  # type: ignore[attr-defined]
    text = log.read_text(errors="replace") if log.is_file() else ""
    return sum("messages are being dropped for client hub" in line for line in text.splitlines())


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = (sys.executable, "-m", "hub.cli", *argv)
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)


async def run(args: argparse.Namespace, work: Path) -> dict[str, float | int | str]:
    from fleet.mqtt import MqttConfig
    from hub.rollout.store import RolloutStore
    from hub.sync.db import db_target
    from hub.sync.store import HubStore
    from registry.publish import set_deployment
    from tests.fleetsim.fleet import HubProcess, SimFleet, wait_store
    from tests.fleetsim.pki import device_ids, fleet_pki
    from tests.hub.postgres import Postgres
    from tests.sync.broker import Broker, free_port
    from tests.sync.helpers import make_blob, new_repo, publish_model

    out: dict[str, float | int | str] = {}

    def step(name: str) -> None:
        done = {k: round(v, 3) for k, v in out.items() if isinstance(v, float)}
        print(f"fleet_sim: {name} {done}", file=sys.stderr)

    t0 = time.monotonic()
    pki = fleet_pki(args.boxes)
    out["pki_s"] = time.monotonic() - t0
    broker = Broker(work / "broker", pki, free_port())
    broker.workdir.mkdir()
    broker.start()
    repo = new_repo(work / "repo")
    for v in ("1", "2", "3"):
        blob = make_blob(work / f"v{v}.bin", 50_000, int(v))
        publish_model(repo, blob, "m", v, group=None, name="model.gguf")
    set_deployment(repo, "edge", "m", version="1", pin=True)
    pg: Postgres | None = None
    if args.postgres:
        pg = Postgres(fsync=True)
        pg.start()
        db: str | Path = pg.new_database()
    else:
        db = db_target(args.db or str(work / "hub.db"))
    HubStore(db).close()  # the schema, made once before the workers race for it
    hubs = [
        HubProcess(
            repo.path,
            db,
            work,
            "127.0.0.1",
            broker.service_port,
            pki,
            rollout_interval_s=args.rollout_interval,
            client_id=f"hub-sim-{i}",
        )
        for i in range(args.workers)
    ]
    for h in hubs:
        h.start()
    root = (repo.path / "metadata" / "1.root.json").read_bytes()
    ids = device_ids(args.boxes)

    def config(d: str) -> MqttConfig:
        return replace(broker.client_config(d), backoff_min_s=0.5, backoff_max_s=5.0, ack_timeout_s=60.0)

    fleet = SimFleet(ids, config, root)
    n = args.boxes
    try:
        fleet.register_keys(db)
        out["threads_before"] = threading.active_count()
        step("connect storm")
        out["connect_s"] = await fleet.start(timeout=args.timeout)
        out["serving_v1_s"] = await fleet.wait(lambda b: b.serving.get("m") == "1", args.timeout, "v1")
        out["inventory_s"] = await wait_store(
            db,
            lambda st: (
                sum(r.state is not None and r.state.serving.get("m") == "1" for r in st.devices()) == n
            ),
            args.timeout,
            "inventory",
        )
        out["connects"] = sum(b.stats.connects for b in fleet.boxes)
        if args.fault:
            out.update(await audit_under_fault(args, fleet, hubs, broker, pg, db))
            return out

        step("state reports")
        # state reports
        marker = 1_000_000.0
        t = time.monotonic()
        for k in range(args.states):
            await asyncio.gather(*(b.publish_state(force=True, at=marker + k) for b in fleet.boxes))
        last = marker + args.states - 1
        await wait_store(
            db,
            lambda st: sum(r.state is not None and r.state.last_sync == last for r in st.devices()) == n,
            args.timeout,
            "state ingest",
            poll_s=0.05,
        )
        out["state_per_s"] = n * args.states / (time.monotonic() - t)

        step("events")
        # events
        t = time.monotonic()
        await asyncio.gather(
            *(
                b.report_event("model", "probe", f"models/m/{i}")
                for b in fleet.boxes
                for i in range(args.events)
            )
        )
        await asyncio.gather(*(b.wait_events_acked(args.timeout) for b in fleet.boxes))
        out["events_per_s"] = n * args.events / (time.monotonic() - t)

        step("audit")
        # audit
        for b in fleet.boxes:
            b.add_audit(args.records)
        t = time.monotonic()
        await asyncio.gather(*(b.upload_audit(args.timeout) for b in fleet.boxes))
        out["audit_s"] = time.monotonic() - t
        out["audit_per_s"] = n * args.records / out["audit_s"]
        out["audit_resends"] = sum(b.stats.audit_resends for b in fleet.boxes)
        # the hub's own pace: boxes whose first batches were all answered (none re-sent)
        first = sorted(b.stats.audit_done_at - t for b in fleet.boxes if not b.stats.audit_resends)
        out["audit_first_pass_boxes"] = len(first)
        out["audit_first_pass_per_s"] = len(first) * args.records / first[-1] if first else 0.0
        out["broker_dropped_for_hub"] = broker_drops(broker)
        bad = [b.id for b in fleet.boxes if b.stats.refusals]
        out["boxes_with_refusals"] = len(bad)

        step("metadata: a new deployment reaching every box")
        # metadata: a new deployment reaching every box
        before = {b.id: set(b.stats.deployments) for b in fleet.boxes}
        t = time.monotonic()
        done = cli("deploy", "--group", "edge", "--model", "m", "--model-version", "2", "--pin",
                   "--repo", str(repo.path), "--db", str(db))  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"edge-hub deploy: {done.stderr}")
        out["deploy_cmd_s"] = time.monotonic() - t
        out["metadata_s"] = await fleet.wait(
            lambda b: len(b.stats.deployments) > len(before[b.id]), args.timeout, "new deployment"
        )
        await fleet.wait(lambda b: b.serving.get("m") == "2", args.timeout, "v2")
        await wait_store(
            db,
            lambda st: (
                sum(r.state is not None and r.state.serving.get("m") == "2" for r in st.devices()) == n
            ),
            args.timeout,
            "inventory on v2",
        )

        if args.no_rollout:
            return out
        step("rollout v2 -> v3")
        # rollout v2 -> v3
        t = time.monotonic()
        done = cli("rollout", "start", "--group", "edge", "--model", "m", "--version", "3",
                   "--waves", "1%,10%,50%,100%", "--repo", str(repo.path), "--db", str(db))  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"edge-hub rollout start: {done.stderr}")
        out["rollout_all_boxes_s"] = await fleet.wait(
            lambda b: b.serving.get("m") == "3", args.timeout * 4, "rollout"
        )
        rstore = RolloutStore(HubStore(db))
        await wait_store(
            db, lambda _st: (r := rstore.latest("edge")) is not None and r.state == "completed",
            args.timeout, "rollout completed",
        )  # fmt: skip
        out["rollout_completed_s"] = time.monotonic() - t
        out["threads"] = threading.active_count()
        out["verified_metadata_sets"] = fleet.verifier.verified
    finally:
        await fleet.close()
        for h in hubs:
            h.stop()
        broker.cleanup()
        if pg is not None:
            pg.stop()
    return out


async def audit_under_fault(
    args: argparse.Namespace, fleet: Any, hubs: list[Any], broker: Any, pg: Any, db: str | Path
) -> dict[str, float | int | str]:
    """The audit phase with one fault once ``args.fault_at`` of the records are acknowledged.

    Invariant of the verdict: a box's records count as lost when a sealed seq is not stored, as
    duplicated when a seq is stored more than once, as altered when a stored hash differs from the
    sealed one; the hub's own chain check (:meth:`HubStore.verify_device`) runs on every device."""
    from hub.sync.store import HubStore

    out: dict[str, float | int | str] = {}
    total = len(fleet.boxes) * args.records
    for b in fleet.boxes:
        b.add_audit(args.records)
    samples: list[tuple[float, int]] = []
    fault_at: list[float] = []

    async def inject() -> None:
        if args.fault in ("kill-worker", "stop-worker"):
            proc = hubs[-1].proc
            assert proc is not None
            if args.fault == "kill-worker":
                proc.kill()
            else:
                proc.terminate()  # SIGTERM, as systemctl stop: the worker leaves, then exits
            await asyncio.to_thread(proc.wait)
            if args.restart_after is not None:  # as systemd's Restart=always, same client id
                await asyncio.sleep(args.restart_after)
                await asyncio.to_thread(hubs[-1].start)
        elif args.fault == "pg-restart":
            assert pg is not None, "--fault pg-restart needs --postgres"
            await asyncio.to_thread(pg.restart)
        elif args.fault == "broker-restart":
            await asyncio.to_thread(broker.restart)
        else:
            raise ValueError(f"unknown --fault {args.fault!r}")

    async def monitor() -> None:
        while True:
            acked = sum(b.stats.audit_acked for b in fleet.boxes)
            now = time.monotonic()
            samples.append((now, acked))
            if not fault_at and acked >= args.fault_at * total:
                fault_at.append(now)
                out["acked_at_fault"] = acked
                t = time.monotonic()
                await inject()
                out["fault_cmd_s"] = time.monotonic() - t
            if acked >= total:
                return
            await asyncio.sleep(0.05)

    t = time.monotonic()
    mon = asyncio.create_task(monitor())
    results = await asyncio.gather(
        *(b.upload_audit(args.timeout) for b in fleet.boxes), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    mon.cancel()
    end = time.monotonic()
    out["audit_s"] = end - t
    out["audit_per_s"] = total / out["audit_s"]
    out["boxes_not_acked"] = len(failed)
    if failed:
        out["first_failure"] = str(failed[0])[:300]
    out["audit_resends"] = sum(b.stats.audit_resends for b in fleet.boxes)
    out["audit_retries"] = sum(b.stats.audit_retries for b in fleet.boxes)
    out["refusals"] = sum(len(b.stats.refusals) for b in fleet.boxes)
    if fault_at:
        f = fault_at[0]
        after = [(s, a) for s, a in samples if s >= f]
        last_t, last_a, stall = f, after[0][1] if after else 0, 0.0
        for s, a in after:
            if a > last_a:
                stall = max(stall, s - last_t)
                last_t, last_a = s, a
        done = next((s for s, a in samples if a >= total), end)
        out["longest_ack_pause_s"] = stall
        out["fault_to_all_acked_s"] = done - f
    store = HubStore(db)
    lost = dup = altered = chain_bad = 0
    try:
        for b in fleet.boxes:
            rows = store.db.query("SELECT seq, hash FROM audit WHERE device = ?", (b.id,))
            seen: dict[int, str] = {}
            for seq, h in rows:
                if int(seq) in seen:
                    dup += 1
                seen[int(seq)] = str(h)
            for r in b.records:
                if r.seq not in seen:
                    lost += 1
                elif seen[r.seq] != r.hash:
                    altered += 1
            n, problems = store.verify_device(b.id)
            chain_bad += bool(problems) or n != len(b.records)
    finally:
        store.close()
    out.update(lost=lost, duplicated=dup, altered=altered, chains_not_verified=chain_bad)
    return out


def render(args: argparse.Namespace, r: dict[str, Any], fds: int) -> str:
    n = args.boxes
    rows = [
        (f"connect storm: all {n} boxes connected (TLS, subscriptions renewed)",
         f"{r['connect_s']:.1f} s ({r['connects']} connections)"),
        ("... every box verified the metadata, fetched its deployment and serves v1",
         f"{r['serving_v1_s']:.1f} s later"),
        ("... the hub's inventory holds every box's state on v1", f"{r['inventory_s']:.1f} s later"),
        (f"state report ingest ({args.states} per box, until the hub stored each box's last)",
         f"{r['state_per_s']:.0f} reports/s"),
        (f"event ingest ({args.events} per box, until every one is acknowledged)",
         f"{r['events_per_s']:.0f} events/s"),
        (f"audit ingest ({args.records} records per box, batches of 1,000, chains and signatures checked)",
         f"{r['audit_per_s']:.0f} records/s ({r['audit_s']:.1f} s, re-sends after the 30 s ack timeout in)"
         ),
        ("... the hub's pace on the batches it was handed (boxes acknowledged without a re-send)",
         f"{r['audit_first_pass_per_s']:.0f} records/s ({r['audit_first_pass_boxes']} boxes)"),
        ("`edge-hub deploy` of v2 (the command itself: fit check, sign)", f"{r['deploy_cmd_s']:.1f} s"),
        ("new deployment at every box: metadata verified, deployment fetched (from the command's start; "
         "goal <= 10 s for 1,000)",
         f"{r['deploy_cmd_s'] + r['metadata_s']:.1f} s ({r['metadata_s']:.1f} s after the command "
         "returned; the hub polls the repository every 2 s)"),
        (f"`edge-hub rollout start --waves 1%,10%,50%,100%` -> every box serves v3 (controller every "
         f"{args.rollout_interval:g} s)", f"{r['rollout_all_boxes_s']:.1f} s"),
        ("... the hub marks the rollout completed", f"{r['rollout_completed_s']:.1f} s"),
    ]  # fmt: skip
    table = "\n".join(["| measure | result |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])
    db_flag = f" --db {args.db}" if args.db else ""
    store = "PostgreSQL" if args.db and args.db.startswith("postgres") else "SQLite"
    return f"""{SECTION}

The hub under simulated boxes (tests/fleetsim/: one process, one MQTT connection and TLS client
certificate per box, speaking the device protocol: state with hardware and health, events acked
by the hub, signed audit chains, retained TUF metadata verified, the deployment fetched by chunk
request, the signed wave selector), a real Mosquitto with the shipped config and plugin, and
{args.workers} `edge-hub serve` process(es) on {store}.
One run, {args.boxes} boxes, CPU {cpu_name()} ({os.cpu_count()} cores shared by the broker, the hub
and the simulator), open-file limit {fds}.

    .venv/bin/python bench/fleet_sim.py --boxes {n} --workers {args.workers}{db_flag} --write

{table}

Audit batches sent again after the device's 30 s ack timeout: {r["audit_resends"]}; after the hub
answered `retry` (database unavailable): {r.get("audit_retries", 0)}; Mosquitto log
lines "Outgoing messages are being dropped for client hub...": {r["broker_dropped_for_hub"]} (its
per-session cap of 64 MiB queued, shipped config, applies to the hub's session too: the boxes'
audit burst overflowed it; docs/operations.md 4.9).
Boxes that saw a refusal: {r["boxes_with_refusals"]}. Distinct metadata sets verified (python-tuf
signature checks, shared by the simulated boxes): {r["verified_metadata_sets"]}. The boxes' paho
clients run on one asyncio loop (tests/fleetsim/loopclient.py; only TCP connect + TLS handshake
use a pool of 8 threads): simulator threads at the end {r["threads"]}.
"""


def main() -> int:
    parser = _report.bench_parser(__doc__, SECTION)
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--db", default=None, help="edge-hub serve --db (default: SQLite in the work dir)")
    parser.add_argument("--workers", type=int, default=1, help="edge-hub serve processes")
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument(
        "--rollout-interval", type=float, default=5.0, help="edge-hub serve --rollout-interval"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--postgres", action="store_true", help="a private PostgreSQL cluster as --db")
    parser.add_argument("--no-rollout", action="store_true", help="stop after the metadata phase")
    parser.add_argument(
        "--fault", choices=("kill-worker", "stop-worker", "pg-restart", "broker-restart"), default=None,
        help="the audit phase only, with this fault (no --write)",
    )  # fmt: skip
    parser.add_argument(
        "--restart-after", type=float, default=None,
        help="kill-worker, stop-worker: start the worker again (same client id) after this many seconds",
    )  # fmt: skip
    parser.add_argument("--fault-at", type=float, default=0.3, help="fraction of records acked")
    args = parser.parse_args()
    fds = raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the broker and hubs
    work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    try:
        result = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, file=sys.stderr)
    if args.fault or args.no_rollout:
        return 0  # numbers for docs/benchmarks.md by hand (the section's table needs every phase)
    _report.report(SECTION, render(args, result, fds), write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
