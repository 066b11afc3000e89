"""``edge-agent probe``, ``edge-agent select`` and ``edge-agent bench``.

* ``probe [--json] [--bandwidth]`` prints the hardware profile of this box.
* ``select [--task T] [--explain] [--json] [--ctx N]`` reads the installed models' GGUF headers,
  probes the box, loads the speeds measured by ``bench`` and the tensor types that failed
  ``edge-agent doctor`` (``<state_dir>/doctor.json``, only when it was measured on the llama.cpp
  build installed now) and prints the choice (with ``--explain``: every candidate, its estimated
  memory, its speed, the verdict and the reason). Exit status 1 when nothing fits.
* ``bench [--model ID] [--tokens N]`` measures prompt and generation tokens/s of installed GGUF
  models with llama.cpp (and the memory copy bandwidth of the box) and stores them in
  ``<state_dir>/selection/speeds.json`` (written atomically), where ``select`` and the daemon's
  re-probe find them. A stored speed is used only while the model file keeps the same size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from agent.config import Settings
from agent.daemon.candidates import BENCH_PROMPT, load_speeds, run_selection, save_speeds, speeds_path
from agent.engine.base import ModelInfo
from agent.errors import AgentError, ConfigError
from agent.hardware.probe import measure_bandwidth, probe
from fleet.hardware import HardwareProfile
from fleet.log import get_logger
from fleet.memory import fmt_bytes
from fleet.selection import (
    Selection,
)

log = get_logger(__name__)


# --- output ---------------------------------------------------------------------------------------


def selection_to_dict(result: Selection) -> dict[str, Any]:
    return {
        "choice": result.choice.id if result.choice else None,
        "message": result.message,
        "budget_bytes": result.budget_bytes,
        "candidates": [
            {
                "id": r.candidate.id,
                "verdict": r.verdict,
                "reason": r.reason,
                "parameters": r.candidate.parameters,
                "quantization": r.candidate.quantization,
                "bits_per_weight": round(r.candidate.bits_per_weight, 3),
                "memory": r.memory.as_dict() if r.memory else None,
                "speed_tps": round(r.speed_tps, 2) if r.speed_tps is not None else None,
                "speed_source": r.speed_source,
            }
            for r in result.rows
        ],
    }


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def print_explain(result: Selection) -> None:
    from rich.table import Table

    table = Table("model", "params", "quant", "memory", "speed", "verdict", "reason")
    for r in result.rows:
        speed = "-" if r.speed_tps is None else f"{r.speed_tps:.1f} tok/s ({r.speed_source})"
        style = {"chosen": "bold green", "fits": "", "rejected": "dim"}[r.verdict]
        table.add_row(
            r.candidate.id,
            f"{r.candidate.parameters / 1e6:,.0f}M" if r.candidate.parameters else "-",
            f"{r.candidate.quantization} ({r.candidate.bits_per_weight:.2f} bpw)"
            if r.candidate.bits_per_weight
            else r.candidate.quantization,
            fmt_bytes(r.memory.total) if r.memory else "-",
            speed,
            r.verdict,
            r.reason,
            style=style,
        )
    console = _console()
    budget = fmt_bytes(result.budget_bytes) if result.budget_bytes is not None else "unknown"
    console.print(f"memory budget: {budget}")
    console.print(table)


def print_profile(p: HardwareProfile) -> None:
    from rich.table import Table

    def size(n: int | None) -> str:
        return fmt_bytes(n) if n is not None else "unknown"

    t = Table("", "", show_header=False)
    t.add_row("device", p.device_model)
    c = p.cpu
    t.add_row(
        "cpu",
        f"{c.model} ({c.arch}), {c.physical_cores or '?'} cores / {c.logical_cores or '?'} threads"
        + (f", quota {c.cpu_quota:g} CPUs" if c.cpu_quota else ""),
    )
    t.add_row("simd", " ".join(sorted(c.features)) or "unknown")
    t.add_row("memory", f"{size(p.memory.available_bytes)} available of {size(p.memory.total_bytes)}")
    t.add_row("swap", f"{size(p.memory.swap_free_bytes)} free of {size(p.memory.swap_total_bytes)}")
    limit = size(p.cgroup.limit_bytes) if p.cgroup.limit_bytes is not None else "no limit"
    t.add_row(
        "cgroup", f"{p.cgroup.version} {p.cgroup.path}: {limit}, working set {size(p.cgroup.usage_bytes)}"
    )
    t.add_row("usable", size(p.usable_memory_bytes))
    t.add_row("disk free", size(p.disk_free_bytes))
    t.add_row("gpus", ", ".join(f"{g.name} ({size(g.memory_total_bytes)})" for g in p.gpus) or "none found")
    t.add_row("accelerators", ", ".join(f"{a.path} ({a.driver})" for a in p.accelerators) or "none found")
    t.add_row("onnx providers", ", ".join(p.onnx_providers) or "unknown")
    temps = ", ".join(f"{z.name} {z.temp_c:.0f}°C" for z in p.thermal if z.temp_c is not None)
    t.add_row(
        "thermal", (temps or "unknown") + ("" if p.throttled is None else f"; throttled: {p.throttled}")
    )
    t.add_row(
        "power", p.power.source + (f" {p.power.battery_percent:.0f}%" if p.power.battery_percent else "")
    )
    if p.memory_bandwidth_gbps:
        t.add_row("bandwidth", f"{p.memory_bandwidth_gbps:.1f} GB/s (copy)")
    for note in p.notes:
        t.add_row("note", note)
    _console().print(t)


# --- commands -------------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    from agent.cli.main import settings_from_args

    settings = settings_from_args(args)
    bandwidth = measure_bandwidth() if args.bandwidth else None
    if bandwidth is None:
        stored = load_speeds(speeds_path(settings)).get("bandwidth_gbps")
        bandwidth = float(stored) if isinstance(stored, int | float) else None
    profile = probe(store_dir=settings.models_dir, bandwidth_gbps=bandwidth)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        print_profile(profile)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from agent.cli.main import settings_from_args

    settings = settings_from_args(args)
    if args.ctx is not None:
        settings = settings.model_copy(
            update={"engine": settings.engine.model_copy(update={"n_ctx": args.ctx})}
        )
    _, result, notes = run_selection(settings, args.task)
    if args.json:
        data = selection_to_dict(result)
        data["notes"] = notes
        print(json.dumps(data, indent=2))
    else:
        if args.explain:
            print_explain(result)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(result.message)
    return 0 if result.choice is not None else 1


def bench_model(info: ModelInfo, settings: Settings, n_gen: int) -> dict[str, Any]:
    """Load ``info`` with the engine the daemon builds and time a prompt and ``n_gen`` greedy tokens.

    Prompt tokens/s = prompt tokens / time to the first chunk; generation tokens/s = the tokens
    after the first / the time after the first chunk.
    """
    return asyncio.run(_bench_engine(info, settings, n_gen))


async def _bench_engine(info: ModelInfo, settings: Settings, n_gen: int) -> dict[str, Any]:
    from agent.engine.base import CompletionRequest, SamplingParams
    from agent.engine.factory import build_engine

    engine = build_engine(info, settings)
    await engine.load()
    try:
        request = CompletionRequest(
            prompt=BENCH_PROMPT * 4,
            max_tokens=n_gen,
            sampling=SamplingParams(temperature=0.0, top_k=1, seed=0),
            request_id="bench",
        )
        started = time.perf_counter()
        first: float | None = None
        usage = None
        async for chunk in engine.generate(request):
            if first is None and chunk.text:
                first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
        ended = time.perf_counter()
    finally:
        await engine.close()
    if usage is None or first is None or usage.completion_tokens < 2:
        raise AgentError(f"{info.id}: the benchmark generated too few tokens to measure")
    return {
        "prompt_tps": round(usage.prompt_tokens / (first - started), 2),
        "gen_tps": round((usage.completion_tokens - 1) / max(ended - first, 1e-9), 2),
        "prompt_tokens": usage.prompt_tokens,
        "gen_tokens": usage.completion_tokens,
        "n_threads": settings.engine.n_threads,
        "file_size": info.size_bytes,
        "measured_at": int(time.time()),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.cli.main import settings_from_args
    from agent.daemon.catalog import discover
    from agent.engine.factory import default_threads

    settings = settings_from_args(args)
    infos = [i for i in discover(settings) if i.format == "gguf"]
    if args.model:
        infos = [i for i in infos if i.id == args.model]
        if not infos:
            raise ConfigError(f"bench: model {args.model!r} is not installed")
    if not infos:
        print("no installed GGUF model to benchmark", file=sys.stderr)
        return 1
    path = speeds_path(settings)
    data = load_speeds(path)
    models = data.get("models")
    if not isinstance(models, dict):
        models = {}
    threads = settings.engine.n_threads or default_threads()
    settings = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"n_threads": threads, "n_ctx": 2048})}
    )
    data["bandwidth_gbps"] = round(measure_bandwidth(), 2)
    print(f"memory copy bandwidth: {data['bandwidth_gbps']} GB/s")
    for info in infos:
        result = bench_model(info, settings, args.tokens)
        models[info.id] = result
        print(f"{info.id}: prompt {result['prompt_tps']} tok/s, generation {result['gen_tps']} tok/s")
    data["models"] = models
    save_speeds(path, data)
    print(f"stored in {path}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("probe", help="show what this box is: CPU, memory, cgroup, accelerators, thermal")
    p.add_argument("--json", action="store_true")
    p.add_argument("--bandwidth", action="store_true", help="also measure the memory copy bandwidth")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("select", help="pick the best installed model that fits this box")
    p.add_argument(
        "--task",
        choices=["completion", "chat", "embedding"],
        default="completion",
        help="what the model must do (default: completion, which chat models also serve)",
    )
    p.add_argument("--explain", action="store_true", help="list every candidate with its verdict")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ctx", type=int, default=None, help="context size to plan for (default: [engine] n_ctx)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("bench", help="measure tokens/s of installed models for selection")
    p.add_argument("--model", default=None, help="only this model id")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per model")
    p.set_defaults(func=cmd_bench)


__all__ = ["bench_model", "register", "selection_to_dict"]
