"""Disk prompt cache: time to first token of a ~2,000-token system prompt after a restart.

Each round, in a fresh empty cache directory:

1. a fresh process loads the engine (:class:`agent.engine.llama.LlamaEngine`, Gemma 3 270M Q4_K_M,
   2 threads, 4 slots of 4,096 tokens, the prompt cache on) and sends the system prompt + question
   1: the **cold** TTFT (nothing cached anywhere); then question 2 after the same system prompt
   (the prefix seen twice is what the cache saves); closing the engine finishes the write;
2. another fresh process (the restart) loads the engine and sends the same system prompt +
   question 3: the **restart** TTFT (the system prompt's cells come from disk).

Model load time is not in either figure (both start timing when the request is sent). Medians
over ``--rounds``; the goal is restart / cold <= 0.2.

    PYTHONPATH=. .venv/bin/python bench/prompt_cache_bench.py --rounds 3 [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = Path.home() / ".cache/edge-agent/test-models/gemma-3-270m-q4_k_m.gguf"
SYSTEM = "You are the support assistant of a fleet of edge devices. Policy: " + " ".join(
    f"Item {i}: device class {i} must report its firmware, uptime and temperature every {i % 7 + 1} minutes."
    for i in range(95)
)
QUESTIONS = (
    "Question: what must device class 3 report?",
    "Question: how often does class 12 report?",
    "Question: which classes report every minute?",
)
SECTION = "## Prompt cache across restarts"


async def one(cache_dir: Path, questions: list[str], invariant: bool) -> dict[str, float]:
    from agent.engine.base import CompletionRequest, ModelInfo, SamplingParams
    from agent.engine.llama import LlamaEngine

    engine = LlamaEngine(
        ModelInfo(id="gemma", path=MODEL, format="gguf"),
        n_ctx=4096,
        n_threads=2,
        n_parallel=4,
        batch_invariant=invariant,
        prompt_cache_dir=cache_dir,
    )
    t_load = time.perf_counter()
    await engine.load()
    load_s = time.perf_counter() - t_load
    try:
        ttfts = []
        for question in questions:
            req = CompletionRequest(
                prompt=SYSTEM + "\n" + question, max_tokens=8, sampling=SamplingParams(temperature=0.0)
            )
            t0 = time.perf_counter()
            ttft = 0.0
            async for _ in engine.generate(req):
                ttft = ttft or time.perf_counter() - t0
            ttfts.append(ttft)
        ttft = ttfts[0]
        question = questions[0]
        assert engine.runner is not None
        stats = engine.runner.stats
        out = {
            "ttft_ms": ttft * 1e3,
            "load_s": load_s,
            "prompt_tokens": len(engine.tokenize(SYSTEM + "\n" + question, add_bos=True)),
            "disk_tokens": stats.disk_tokens,
        }
    finally:
        t_close = time.perf_counter()
        await engine.close()
        out["close_s"] = time.perf_counter() - t_close
    files = list(cache_dir.glob("*.kv"))
    out["cache_bytes"] = sum(f.stat().st_size for f in files)
    return out


def run_child(cache_dir: Path, questions: str, invariant: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(cache_dir), questions, str(int(invariant))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def per_round(rows: list[dict[str, float]]) -> str:
    return ", ".join(f"{x['ttft_ms']:.0f}" for x in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-invariant", action="store_true", help="measure the batch-invariant mode")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        d, q, inv = args.child
        picked = [QUESTIONS[int(i)] for i in q.split(",")]
        print(json.dumps(asyncio.run(one(Path(d), picked, bool(int(inv))))))
        return
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cold.append(run_child(Path(tmp), "0,1", args.batch_invariant))
            warm.append(run_child(Path(tmp), "2", args.batch_invariant))
        print(f"round {r}: cold {cold[-1]} restart {warm[-1]}", flush=True)
    c = statistics.median(x["ttft_ms"] for x in cold)
    w = statistics.median(x["ttft_ms"] for x in warm)
    mode = "batch-invariant" if args.batch_invariant else "fast"
    lines = [
        f"Gemma 3 270M Q4_K_M, 2 threads, 4 slots of 4,096 tokens, {mode} mode; a "
        f"{int(cold[0]['prompt_tokens'])}-token prompt (system prompt + question); {args.rounds} rounds, "
        f"each phase a fresh process; load average at start {load:.2f}. Reproduce with "
        f"`PYTHONPATH=. .venv/bin/python bench/prompt_cache_bench.py --rounds {args.rounds}"
        f"{' --batch-invariant' if args.batch_invariant else ''} --write`.",
        "",
        "| | TTFT ms (median) | per round | prompt tokens from disk |",
        "|---|---|---|---|",
        f"| cold start (empty cache) | {c:.0f} | {per_round(cold)} | 0 |",
        f"| after a restart (other question) | {w:.0f} | {per_round(warm)} | {int(warm[0]['disk_tokens'])} |",
        "",
        f"Restart / cold: **{w / c:.2f}** (goal <= 0.2). Cache file: "
        f"{cold[0]['cache_bytes'] / 2**20:.1f} MiB; closing the first engine (which finishes the write, "
        f"fsync included) took {statistics.median(x['close_s'] for x in cold):.2f} s.",
    ]
    from _report import report

    report(SECTION, SECTION + "\n\n" + "\n".join(lines), write=args.write)


if __name__ == "__main__":
    main()
