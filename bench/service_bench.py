"""Service benchmark: time to READY=1, memory with no model, idle CPU.

Runs the real ``edge-agent run`` with ``$NOTIFY_SOCKET`` pointing at a datagram socket this script
binds (what systemd does for Type=notify) and measures:

- time from process start (just before ``exec``) to ``READY=1``, with the Gemma 3 270M model to
  load (the goal is <= 1.5 s), and to the ``STATUS=serving ...`` line sent once it has loaded;
- resident memory (VmRSS) with no model, 2 s after READY=1 (goal <= 80 MB);
- CPU used over an idle period (no requests), with the model loaded (goal: about 0).

Peer, in the same run and the same way: a minimal aiohttp application on a Unix socket that sends
READY=1 once it accepts — the floor for this stack (Python + aiohttp + a Unix socket). The agent's
numbers are reported as ratios against it.

    .venv/bin/python bench/service_bench.py                # 5 rounds, 30 s idle, print
    .venv/bin/python bench/service_bench.py --write        # and replace "## Service" in docs/benchmarks.md
    .venv/bin/python bench/service_bench.py --quick        # 2 rounds, 5 s idle (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: docs/benchmarks.md sections

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT))

PEER = textwrap.dedent(
    """
    import asyncio, os, socket, sys
    from aiohttp import web

    async def health(request):
        return web.json_response({"status": "ok"})

    async def main():
        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, sys.argv[1]).start()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
        s.close()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class Listener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_for(self, prefix: str, timeout: float) -> float:
        """``time.monotonic()`` when a datagram with a line starting with ``prefix`` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} within {timeout}s")
            self.sock.settimeout(left)
            data = self.sock.recv(65536).decode()
            if any(line.startswith(prefix) for line in data.split("\n")):
                return time.monotonic()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], float]:
    with log.open("wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def agent_env(state: Path, notify: Path, model: Path | None, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(
        {
            "EDGE_AGENT_STATE_DIR": str(state),
            "EDGE_AGENT_LOG__FORMAT": "json",
            "EDGE_AGENT_ENGINE__N_THREADS": str(threads),
            "EDGE_AGENT_ENGINE__N_CTX": "2048",
            "NOTIFY_SOCKET": str(notify),
        }
    )
    if model is not None:
        env["EDGE_AGENT_MODEL__PATH"] = str(model)
    return env


def agent_round(work: Path, model: Path | None, threads: int, idle_s: float) -> dict[str, float]:
    notify = Listener(work / "notify.sock")
    state = work / "state"
    try:
        cmd = [sys.executable, "-m", "agent.cli", "run"]
        proc, t0 = start(cmd, agent_env(state, notify.path, model, threads), work / "fleet.log")
        try:
            ready = notify.wait_for("READY=1", 60) - t0
            out: dict[str, float] = {"ready_s": ready}
            if model is not None:
                out["serving_s"] = notify.wait_for("STATUS=serving", 120) - t0
                time.sleep(1.0)  # let start-up work settle before the idle window
                out["idle_cpu_pct"] = idle_cpu_pct(proc.pid, idle_s)
                out["rss_loaded_bytes"] = rss_bytes(proc.pid)
            else:
                time.sleep(2.0)
                out["rss_bytes"] = rss_bytes(proc.pid)
                out["idle_cpu_pct"] = idle_cpu_pct(proc.pid, idle_s)
            return out
        finally:
            stop(proc)
    finally:
        notify.close()


def idle_cpu_pct(pid: int, idle_s: float) -> float:
    """CPU use of ``pid`` over the next ``idle_s`` seconds, in percent of one core."""
    c0 = cpu_seconds(pid)
    time.sleep(idle_s)
    return 100 * (cpu_seconds(pid) - c0) / idle_s


def peer_round(work: Path, idle_s: float) -> dict[str, float]:
    notify = Listener(work / "peer-notify.sock")
    sock = work / "peer.sock"
    sock.unlink(missing_ok=True)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    try:
        proc, t0 = start([sys.executable, "-c", PEER, str(sock)], env, work / "peer.log")
        try:
            out = {"ready_s": notify.wait_for("READY=1", 60) - t0}
            time.sleep(2.0)
            out["rss_bytes"] = rss_bytes(proc.pid)
            out["idle_cpu_pct"] = idle_cpu_pct(proc.pid, idle_s)
            return out
        finally:
            stop(proc)
    finally:
        notify.close()


def import_time_s() -> float:
    """Wall time of ``python -c 'import agent.daemon.app'`` (what start-up pays before binding)."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import agent.daemon.app"], check=True, cwd=ROOT)
    return time.monotonic() - t0


def bench(rounds: int, idle_s: float, threads: int) -> dict[str, Any]:
    from agent.demo import demo_model_file
    from tests.conftest import MODEL_CACHE

    model = demo_model_file(MODEL_CACHE)
    runs: dict[str, list[dict[str, float]]] = {"agent_model": [], "agent_empty": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="service-bench-") as tmp:
        work = Path(tmp)
        for i in range(rounds):
            # Alternate the order so neither side always runs on a warmer machine.
            order = (
                ["peer", "agent_empty", "agent_model"] if i % 2 else ["agent_model", "agent_empty", "peer"]
            )
            for name in order:
                sub = work / f"{name}-{i}"
                sub.mkdir()
                if name == "peer":
                    runs[name].append(peer_round(sub, idle_s))
                else:
                    runs[name].append(
                        agent_round(sub, model if name == "agent_model" else None, threads, idle_s)
                    )
        imports = [import_time_s() for _ in range(rounds)]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "rounds": rounds,
        "idle_s": idle_s,
        "model": f"{model.name}, {model.stat().st_size / 2**20:.1f} MiB",
        "agent_ready_s": med("agent_model", "ready_s"),
        "agent_ready_empty_s": med("agent_empty", "ready_s"),
        "agent_serving_s": med("agent_model", "serving_s"),
        "agent_rss_empty": med("agent_empty", "rss_bytes"),
        "agent_rss_loaded": med("agent_model", "rss_loaded_bytes"),
        "agent_idle_cpu_pct": med("agent_model", "idle_cpu_pct"),
        "agent_idle_cpu_empty_pct": med("agent_empty", "idle_cpu_pct"),
        "peer_ready_s": med("peer", "ready_s"),
        "peer_rss": med("peer", "rss_bytes"),
        "peer_idle_cpu_pct": med("peer", "idle_cpu_pct"),
        "import_agent_app_s": statistics.median(imports),
        "raw": runs,
    }


def section(r: dict[str, Any], command: str) -> str:
    mb = 1_000_000
    ready_ok = r["agent_ready_s"] <= 1.5
    rss_ok = r["agent_rss_empty"] <= 80 * mb
    cpu_ok = r["agent_idle_cpu_pct"] < 1.0
    lines = [
        "## Service",
        "",
        f"Reproduce: `{command}` ({r['machine']}; the machine was shared with other work, so absolute "
        "numbers vary; the ratios are measured in the same run). Medians of "
        f"{r['rounds']} alternating rounds; idle CPU over {r['idle_s']:.0f} s without requests.",
        "",
        "Peer: a minimal aiohttp application on a Unix socket that sends READY=1 once it accepts "
        "(the floor for Python + aiohttp), started and measured the same way. "
        f"Model: {r['model']}.",
        "",
        "| measure | edge-agent | peer | ratio (agent / peer) | goal |",
        "| --- | --- | --- | --- | --- |",
        f"| process start -> READY=1, model to load | {r['agent_ready_s']:.2f} s | "
        f"{r['peer_ready_s']:.2f} s | {r['agent_ready_s'] / r['peer_ready_s']:.2f} | "
        f"<= 1.5 s: **{'pass' if ready_ok else 'FAIL'}** |",
        f"| process start -> READY=1, no model | {r['agent_ready_empty_s']:.2f} s | "
        f"{r['peer_ready_s']:.2f} s | {r['agent_ready_empty_s'] / r['peer_ready_s']:.2f} | |",
        f"| process start -> model loaded (STATUS=serving) | {r['agent_serving_s']:.2f} s | | | |",
        f"| resident memory, no model | {r['agent_rss_empty'] / mb:.1f} MB | {r['peer_rss'] / mb:.1f} MB | "
        f"{r['agent_rss_empty'] / r['peer_rss']:.2f} | <= 80 MB: **{'pass' if rss_ok else 'FAIL'}** |",
        f"| resident memory, model loaded | {r['agent_rss_loaded'] / mb:.1f} MB | | | |",
        f"| idle CPU, model loaded | {r['agent_idle_cpu_pct']:.2f} % | {r['peer_idle_cpu_pct']:.2f} % | | "
        f"about 0: **{'pass' if cpu_ok else 'FAIL'}** |",
        f"| idle CPU, no model | {r['agent_idle_cpu_empty_pct']:.2f} % | | | |",
        f"| `import agent.daemon.app` (wall, with start-up) | {r['import_agent_app_s']:.2f} s | | | |",
        "",
        "READY=1 is sent as soon as the API socket accepts, before the model has loaded (`/health` "
        "says `loading` meanwhile), so it does not depend on the model's size. What it costs is "
        "imports: pydantic (settings), aiohttp, structlog (which pulls in rich), cryptography and "
        "sqlite for the audit log. The model-to-load rounds serve a file (`[model] path`); the "
        "no-model rounds also look into the (empty) signed store, which imports the TUF client "
        "(about 0.08 s on a quiet machine). On this shared machine the rounds vary by a factor of "
        "two or three (per-round values below), so the difference between the two READY rows is "
        "noise, not a cost of having a model. llama_cpp is imported by the engine while the model "
        "loads; apscheduler, and the selection code (gguf, numpy: ~15 MB) on the first re-probe, "
        "after READY=1. Idle CPU is measured without the watchdog; with `WatchdogSec=30` the agent "
        "wakes every 15 s to send WATCHDOG=1.",
        "",
        "Per-round READY=1 times (s): " + _per_round(r) + ".",
        "",
    ]
    return "\n".join(lines)


def _per_round(r: dict[str, Any]) -> str:
    parts = []
    for name, key in (("model", "agent_model"), ("no model", "agent_empty"), ("peer", "peer")):
        times = ", ".join(f"{x['ready_s']:.2f}" for x in r["raw"][key])
        parts.append(f"{name} {times}")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 5 s idle")
    parser.add_argument("--write", action="store_true", help='replace "## Service" in docs/benchmarks.md')
    parser.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    parser.add_argument("--from-json", type=Path, default=None, help="render a saved report, do not measure")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.idle = 2, 5.0
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        args.rounds, args.idle = report["rounds"], report["idle_s"]
    else:
        report = bench(args.rounds, args.idle, args.threads)
    command = ".venv/bin/python bench/service_bench.py" + (" --quick" if args.quick else "")
    command += f" --rounds {args.rounds} --idle {args.idle:g}" if not args.quick else ""
    command += " --write" if args.write else ""
    text = section(report, command)
    print(text)
    if args.json is not None and args.from_json is None:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        _report.write_section("## Service", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
