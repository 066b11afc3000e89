"""Decode ceiling: what llama.cpp itself gives for n sequences decoded together, no server around it.

Through the same low-level adapter the engine uses (:mod:`agent.engine.native`), each sequence gets
a short prompt, then every step decodes one token of each of the ``n`` sequences in one batch
(rows in sequence order, so llama.cpp makes one micro-batch) and samples each greedily. Reported:
aggregate tokens/s and milliseconds per step for 1, 4 and 8 sequences, in two configurations:

* edge-agent's defaults: plain CPU kernels (``use_extra_bufts = false``) and a KV stream per
  sequence (``kv_unified = false``), the settings that make a stream's greedy output the same alone
  or batched (docs/engine.md);
* llama.cpp's defaults: repacked kernels and one unified KV cache.

This is the upper bound for the "8 streams" column of the Inference section: the server adds HTTP,
scheduling, prompt processing and sampling on the same two cores.

    .venv/bin/python bench/decode_ceiling.py --write
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import bench_parser, report  # noqa: E402

SECTION = "## Decode ceiling"
CONFIGS = (("edge-agent defaults (plain kernels, KV stream per sequence)", False, False),
           ("llama.cpp defaults (repacked kernels, unified KV)", True, True))  # fmt: skip


def measure(
    model: Path, *, repack: bool, unified: bool, n: int, steps: int, threads: int, n_ctx: int
) -> float:
    """Seconds per step of ``n`` one-token rows, after a warm-up of 4 steps."""
    from agent.engine.base import SamplingParams
    from agent.engine.native import NativeContext, NativeModel

    m = NativeModel(model, repack=repack)
    ctx = NativeContext(
        m, n_ctx=n_ctx * (1 if unified else n), n_batch=512, n_slots=n, n_threads=threads, unified=unified
    )
    try:
        pos: list[int] = []
        cur: list[int] = []
        for s in range(n):
            toks = m.tokenize(f"Story {s}: once upon a time, there was", add_bos=True)
            logits = [False] * (len(toks) - 1) + [True]
            if ctx.decode(toks, list(range(len(toks))), [s] * len(toks), logits) != 0:
                raise RuntimeError("prompt decode failed")
            pos.append(len(toks))
            cur.append(toks[-1])
        samplers = [ctx.make_sampler(SamplingParams(temperature=0.0), []) for _ in range(n)]
        t0 = 0.0
        for step in range(steps + 4):
            if step == 4:
                t0 = time.perf_counter()
            if ctx.decode(cur, pos, list(range(n)), [True] * n) != 0:
                raise RuntimeError("decode failed")
            cur = [samplers[i].sample(i) for i in range(n)]
            pos = [p + 1 for p in pos]
        return (time.perf_counter() - t0) / steps
    finally:
        ctx.close()
        m.close()


def main() -> int:
    ap = bench_parser(__doc__, SECTION)
    ap.add_argument("--model", type=Path, help="GGUF file (default: the demo Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096, help="KV cells per sequence")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--sequences", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    args = ap.parse_args()
    if args.model is None:
        from agent.demo import demo_model_file

        args.model = demo_model_file(Path.home() / ".cache" / "edge-agent" / "test-models")
    from agent.engine.native import silence_llama_logs

    silence_llama_logs()
    load = os.getloadavg()[0]
    seqs = args.sequences
    lines = [
        SECTION,
        "",
        f"{args.model.name}, {args.threads} threads, {args.steps} steps of one token per sequence after a "
        f"4-step warm-up, greedy sampling; {os.cpu_count()} cores, load average at start {load:.2f}. "
        "Reproduce with `python bench/decode_ceiling.py --write`. The upper bound for the Inference "
        "section's concurrent streams (no HTTP, scheduling or prompt processing).",
        "",
        "| configuration | " + " | ".join(f"{n} seq tok/s (ms/step)" for n in seqs) + " |",
        "|---|" + "---|" * len(seqs),
    ]
    for name, repack, unified in CONFIGS:
        cells = []
        for n in seqs:
            step = measure(
                args.model, repack=repack, unified=unified, n=n, steps=args.steps, threads=args.threads,
                n_ctx=args.ctx,
            )  # fmt: skip
            cells.append(f"{n / step:.1f} ({step * 1000:.0f})")
            print(f"{name}: {n} -> {n / step:.1f} tok/s", file=sys.stderr)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    report(SECTION, "\n".join(lines) + "\n", write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
