"""Fast mode against batch-invariant mode, in process (no HTTP): what ``[engine] batch_invariant``
costs or buys on this machine.

For each mode, alternating, a fresh :class:`agent.engine.llama.LlamaEngine` (Gemma 3 270M Q4_K_M,
2 threads, ``--slots`` slots of 4,096 tokens each) measures:

* aggregate tok/s of ``n`` concurrent 128-token greedy completions (end-of-generation banned);
* time to first token of a ~1,100-token prompt, then of the same prefix with another question
  (the second request's reuse: token-exact in fast mode, whole 256-token chunks otherwise).

Each mode runs in a fresh process (ggml reads ``GGML_CPU_TILED_MM`` once per process). Medians
over ``--rounds`` alternating rounds. The llama-server peer is in ``bench/engine_bench.py``.

    PYTHONPATH=. .venv/bin/python bench/mode_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = Path.home() / ".cache/edge-agent/test-models/gemma-3-270m-q4_k_m.gguf"
PREFIX = "Background: " + " ".join(
    f"Section {i}: the committee reviewed the budget, the schedule and the staffing plan." for i in range(70)
)


async def one_mode(invariant: bool, streams: list[int], slots: int) -> dict[str, float]:
    from agent.engine.base import CompletionRequest, ModelInfo, SamplingParams
    from agent.engine.llama import LlamaEngine

    engine = LlamaEngine(
        ModelInfo(id="gemma", path=MODEL, format="gguf"),
        n_ctx=4096,
        n_threads=2,
        n_parallel=slots,
        batch_invariant=invariant,
    )
    await engine.load()
    out: dict[str, float] = {}
    try:
        eos = engine.tokenize("<eos>")
        sampling = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(eos, -100.0))

        async def ttft(prompt: str, n: int = 8) -> tuple[float, int]:
            t0 = time.perf_counter()
            first = 0.0
            count = 0
            async for chunk in engine.generate(
                CompletionRequest(prompt=prompt, max_tokens=n, sampling=sampling)
            ):
                if not first:
                    first = time.perf_counter() - t0
                count += chunk.usage.completion_tokens if chunk.usage else 0
            return first, count

        await ttft("Hello", 4)  # warm-up
        for n in streams:
            prompts = [f"Story number {i}: once upon a time in a small town, there was" for i in range(n)]
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(ttft(p, 128) for p in prompts))
            out[f"{n} streams tok/s"] = sum(c for _, c in counts) / (time.perf_counter() - t0)
        out["first long prompt TTFT ms"] = (await ttft(PREFIX + " Question: what was reviewed first?"))[
            0
        ] * 1e3
        out["second request TTFT ms"] = (await ttft(PREFIX + " Question: who wrote the plan?"))[0] * 1e3
        out["prompt tokens"] = len(engine.tokenize(PREFIX))
    finally:
        await engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,8,16")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--one", choices=("fast", "invariant"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    if args.one:
        print(json.dumps(asyncio.run(one_mode(args.one == "invariant", streams, args.slots))))
        return
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for invariant in (False, True) if r % 2 == 0 else (True, False):
            cmd = [sys.executable, __file__, "--one", "invariant" if invariant else "fast"]
            cmd += ["--streams", args.streams, "--slots", str(args.slots)]
            res = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            print(
                ("invariant" if invariant else "fast"), {k: round(v, 1) for k, v in res.items()}, flush=True
            )
            results[invariant].append(res)
    print("| | fast | batch-invariant | fast / invariant |")
    print("|---|---|---|---|")
    for key in results[False][0]:
        f = statistics.median(r[key] for r in results[False])
        i = statistics.median(r[key] for r in results[True])
        print(f"| {key} | {f:.1f} | {i:.1f} | {f / i:.2f} |")


if __name__ == "__main__":
    main()
