"""Validate fleet.memory's estimate against real llama.cpp loads of Gemma 3 270M.

For each context size, a fresh subprocess imports llama_cpp, records its RSS, loads the model with
the daemon's own engine (``agent.engine.factory.build_engine`` with the default engine settings: n_batch 512,
``n_parallel`` 4 slots with a KV stream of ``n_ctx`` cells each (``kv_unified = false``: 4 x n_ctx
cells in all), full-size SWA cache, plain batch-invariant kernels, 2 threads), runs a completion
whose prompt fills ``min(n_ctx, --fill)`` tokens of the context (so the attention scratch is
really written) plus a few generated tokens, and reports its peak RSS (``ru_maxrss``) minus the RSS
before the load. The estimate is computed for the same settings and ``context_used``; the worst
case (context full) is shown too. ``--kv-unified`` and ``--repack`` measure the other settings.

    .venv/bin/python bench/memory_estimate.py            # prints a markdown table
    .venv/bin/python bench/memory_estimate.py --ctx 8192 32768 --fill 8192
    .venv/bin/python bench/memory_estimate.py --kv-unified --repack
    .venv/bin/python bench/memory_estimate.py --onnx     # the MiniLM INT8 encoder (onnxruntime)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.hardware import CpuInfo  # noqa: E402
from fleet.memory import MIB, ModelShape, RuntimeParams, estimate, repack_types, shape_from_gguf  # noqa: E402
from registry.gguf_info import read_gguf_info  # noqa: E402

MAX_OVER = 0.20
"""Largest over-estimate allowed (estimate / measured - 1): budget left unused, never a crash."""
MAX_UNDER = 0.10
"""Largest under-estimate allowed: an under-estimate is how a box gets OOM-killed."""

CHILD = r"""
import asyncio, json, resource, sys
import psutil
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from agent.engine.factory import build_engine
from agent.daemon.catalog import info_for_file
from agent.config import EngineSettings, Settings
from agent.engine.base import CompletionRequest, SamplingParams
import llama_cpp  # noqa: F401  (imported before the baseline, as in the daemon)

path, n_ctx, fill = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
unified, repack = sys.argv[5] == "1", sys.argv[6] == "1"
proc = psutil.Process()

async def main():
    settings = Settings(engine=EngineSettings(
        n_ctx=n_ctx, n_threads=2, kv_unified=unified, batch_invariant=not repack))
    engine = build_engine(info_for_file(path), settings)
    base = proc.memory_info().rss
    await engine.load()
    after_load = proc.memory_info().rss
    words = " ".join(f"Edge box {i} reports temperature, memory and load." for i in range(4000))
    tokens = engine.count_tokens(words)
    keep = max(16, min(n_ctx, fill) - 8)
    prompt = words[: int(len(words) * keep / tokens)]
    greedy = SamplingParams(temperature=0.0, top_k=1)
    request = CompletionRequest(prompt=prompt, max_tokens=4, sampling=greedy)
    usage = None
    async for chunk in engine.generate(request):
        usage = chunk.usage or usage
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    await engine.close()
    used = usage.prompt_tokens + usage.completion_tokens
    e = settings.engine
    print(json.dumps({"base": base, "load": after_load - base, "peak": peak - base, "used": used,
                      "n_seq": e.n_parallel, "kv_unified": e.kv_unified, "repack": not e.batch_invariant}))

asyncio.run(main())
"""


def this_cpu() -> CpuInfo:
    from agent.hardware.probe import probe_cpu

    return probe_cpu(Path("/"), live=True)


def cpu_description(cpu: CpuInfo) -> str:
    """``model name`` of /proc/cpuinfo and whether the CPU has AVX-512 and AMX."""
    avx512 = "AVX-512" if "avx512f" in cpu.features else "no AVX-512"
    amx = "AMX" if "amx_tile" in cpu.features else "no AMX"
    return f"{cpu.model} ({cpu.arch}, {avx512}, {amx})"


def ollama_formula(shape: ModelShape, n_ctx: int, batch: int = 512, n_parallel: int = 1) -> int:
    """Ollama's estimate for the same header, written out from llm/memory.go and GraphSize (gemma
    branch): weights + per-layer f16 KV (``n_parallel x n_ctx`` cells; sliding layers at
    parallel x window + batch) + graph. ``n_parallel`` is the slots with their own cache."""
    ctx = n_ctx * n_parallel
    width = shape.key_length + shape.value_length
    kv = 0
    for layer in range(shape.n_layers):
        cells = ctx
        if shape.is_swa(layer) and shape.sliding_window:
            cells = n_parallel * shape.sliding_window + batch
        kv += cells * width * shape.kv_heads(layer) * 2
    heads = shape.n_head
    graph = max(
        4 * batch * (shape.n_embd + shape.n_vocab),
        4 * batch * (2 + ctx + ctx * heads + 2 * shape.n_embd + 2 * shape.key_length * heads),
    )
    return shape.file_size + kv + graph


ONNX_CHILD = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort
import psutil
path, batch, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process()
base = proc.memory_info().rss
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
feeds = {i.name: np.ones((batch, length), dtype=np.int64) for i in session.get_inputs()}
session.run(None, feeds)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak - base}))
"""


def onnx_table() -> float:
    """The demo MiniLM INT8 encoder: session + one batch, fresh process per shape."""
    from agent.daemon.candidates import onnx_initializers
    from agent.demo import embedding_model_files
    from fleet.memory import ModelShape, estimate_onnx

    path, _ = embedding_model_files()
    weights, params = onnx_initializers(path)
    shape = ModelShape.onnx(path.stat().st_size, weights)
    print(f"model: {path.name}, {params:,} parameters, initializers {weights / MIB:.1f} MiB\n")
    print("| batch x tokens | measured peak | estimate | error |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for batch, length in ((1, 16), (8, 128), (32, 256)):
        out = subprocess.run(
            [sys.executable, "-c", ONNX_CHILD, str(path), str(batch), str(length)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        est = estimate_onnx(shape, RuntimeParams(onnx_batch=batch, onnx_max_length=length)).total
        error = (est - peak) / peak
        worst = max(worst, abs(error))
        print(f"| {batch} x {length} | {peak / MIB:.0f} MiB | {est / MIB:.0f} MiB | {error:+.1%} |")
    return worst


def measure(path: Path, n_ctx: int, fill: int, *, unified: bool, repack: bool) -> dict[str, int]:
    flags = [str(int(unified)), str(int(repack))]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(n_ctx), str(fill), str(ROOT), *flags],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the demo model)")
    parser.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--fill", type=int, default=2048, help="tokens of context to fill (cap)")
    parser.add_argument("--kv-unified", action="store_true", help="slots share n_ctx cells")
    parser.add_argument("--repack", action="store_true", help="repacked kernels (batch_invariant false)")
    parser.add_argument("--onnx", action="store_true", help="validate the ONNX estimate instead")
    args = parser.parse_args()
    if args.onnx:
        worst_onnx = onnx_table()
        print(f"\nlargest error: {worst_onnx:.1%} (bound: 20%)")
        return 0 if worst_onnx <= 0.20 else 1
    path = args.model
    if path is None:
        from agent.demo import demo_model_file

        path = demo_model_file(Path.home() / ".cache" / "edge-agent" / "test-models")
    shape = shape_from_gguf(read_gguf_info(path))
    kv = "unified KV" if args.kv_unified else "a KV stream per slot"
    kernels = "repacked kernels" if args.repack else "plain kernels"
    cpu = this_cpu()
    print(f"cpu: {cpu_description(cpu)}")
    print(
        f"model: {path.name}, {kv}, {kernels}, fill: up to {args.fill} tokens, "
        "peak RSS increase over the pre-load RSS\n"
    )
    print(
        "| n_ctx | tokens in context | measured peak | estimate (same context) | error | worst-case estimate "
        "(context full) | llama.cpp compute reservation | Ollama's formula | its error |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors: list[float] = []
    for n_ctx in args.ctx:
        m = measure(path, n_ctx, args.fill, unified=args.kv_unified, repack=args.repack)
        params = RuntimeParams(
            n_ctx=n_ctx,
            n_seq=m["n_seq"],
            kv_unified=bool(m["kv_unified"]),
            repack=bool(m["repack"]),
            repack_types=repack_types(cpu.arch, cpu.features),
        )
        est = estimate(shape, replace(params, context_used=m["used"]))
        worst = estimate(shape, params)
        ollama = ollama_formula(shape, n_ctx, n_parallel=1 if m["kv_unified"] else m["n_seq"])
        error = (est.total - m["peak"]) / m["peak"]
        errors.append(error)
        print(
            f"| {n_ctx} | {m['used']} | {m['peak'] / MIB:.0f} MiB | {est.total / MIB:.0f} MiB | "
            f"{error:+.1%} | {worst.total / MIB:.0f} MiB | {est.compute_reserved / MIB:.0f} MiB | "
            f"{ollama / MIB:.0f} MiB | {(ollama - m['peak']) / m['peak']:+.1%} |"
        )
    low, high = min(errors), max(errors)
    print(f"\nerrors from {low:+.1%} to {high:+.1%} (bound: {-MAX_UNDER:+.0%} to {MAX_OVER:+.0%})")
    return 0 if low >= -MAX_UNDER and high <= MAX_OVER else 1


if __name__ == "__main__":
    raise SystemExit(main())
