"""Selection cost over 1,000 manifests, and the speed estimate against measured tokens/s.

1. ``select()`` over 1,000 synthetic manifests (shapes of real GGUF families, random sizes and
   quantizations) on a replayed Raspberry Pi 5 profile: median and worst of 20 runs (target < 50 ms).
2. The speed estimate's calibration: this box's memory copy bandwidth (``measure_bandwidth``) and
   the generation tokens/s the daemon's engine reaches with real Gemma 3 270M variants (2 threads);
   the ratio measured / (bandwidth / file size) is the efficiency that ``SPEED_EFFICIENCY`` encodes.

    .venv/bin/python bench/selection_bench.py            # both parts
    .venv/bin/python bench/selection_bench.py --no-speed # only the selection timing
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.hardware.probe import measure_bandwidth, probe
from fleet.memory import ModelShape, RuntimeParams
from fleet.selection import SPEED_EFFICIENCY, Candidate, SelectionPolicy, select

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = [  # layers, heads, kv heads, embedding, vocab, sliding window
    ("gemma3", 18, 4, 1, 640, 262144, 512),
    ("qwen2", 28, 12, 2, 1536, 151936, None),
    ("llama", 32, 32, 8, 4096, 128256, None),
    ("phi3", 32, 32, 32, 3072, 32064, None),
]


def manifests(n: int, seed: int = 7) -> list[Candidate]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fam, layers, heads, kv, embd, vocab, window = rng.choice(FAMILIES)
        params = rng.choice([135, 270, 500, 1_000, 1_500, 3_000, 7_000, 8_000]) * 1_000_000
        bpw = rng.choice([4.5, 4.9, 5.5, 6.6, 8.5, 16.0])
        shape = ModelShape(
            file_size=int(params * bpw / 8),
            n_layers=layers,
            n_embd=embd,
            n_head=heads,
            n_head_kv=(kv,),
            key_length=embd // heads,
            value_length=embd // heads,
            n_vocab=vocab,
            sliding_window=window,
            swa_layers=tuple(il % 6 != 5 for il in range(layers)) if window else (),
        )
        out.append(
            Candidate(f"{fam}-{i:04d}", fam, params, f"{bpw}bpw", bpw, "gguf", "completion", shape, 32768)
        )
    return out


def time_selection(runs: int = 20) -> tuple[float, float, str]:
    profile = probe(ROOT / "tests/fixtures/machines/rpi5-8gb", gpus=lambda: (), onnx_providers=lambda: ())
    cands = manifests(1000)
    policy = SelectionPolicy(task="completion", runtime=RuntimeParams(n_ctx=4096), speed_floor_tps=2.0)
    times = []
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = select(profile, cands, policy)
        times.append(time.perf_counter() - t0)
    assert result is not None
    return statistics.median(times), max(times), result.message


def speed_calibration(tokens: int) -> list[tuple[str, int, float, float]]:
    from agent.cli.select import bench_model
    from agent.config import EngineSettings, Settings
    from agent.daemon.catalog import info_for_file
    from tests.conftest import MODEL_CACHE
    from tests.selection.conftest import quantize_variant

    source = MODEL_CACHE / "gemma-3-270m-q4_k_m.gguf"
    paths = {"Q4_K_M": source, **{q: quantize_variant(source, q) for q in ("Q8_0", "F16")}}
    settings = Settings(engine=EngineSettings(n_threads=2, n_ctx=2048))
    rows = []
    for name, path in paths.items():
        bandwidth = measure_bandwidth()
        result = bench_model(info_for_file(path), settings, tokens)
        rows.append((name, path.stat().st_size, bandwidth, float(result["gen_tps"])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    median, worst, message = time_selection()
    print("## selection over 1,000 manifests (replayed Raspberry Pi 5 profile)\n")
    print(f"median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms of 20 runs (target < 50 ms)")
    print(f"choice: {message}\n")
    if args.no_speed:
        return 0
    print("## speed estimate calibration (engine, 2 threads, greedy)\n")
    print(
        "| variant | file | copy bandwidth | measured gen tok/s | bandwidth / file | efficiency | "
        f"estimate at {SPEED_EFFICIENCY} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size, bw, tps in speed_calibration(args.tokens):
        ideal = bw * 1e9 / size
        cells = [name, f"{size / 2**20:.0f} MiB", f"{bw:.1f} GB/s", f"{tps:.1f}", f"{ideal:.1f}"]
        cells += [f"{tps / ideal:.2f}", f"{SPEED_EFFICIENCY * ideal:.1f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
