"""Resident memory after a run: edge-agent (its daemon, over the socket) against a llama.cpp context
made with llama-server's parameters, per KV cache type.

The settings of issue 17's comparison: Gemma 3 270M Q4_K_M, 2 threads, 8 slots, 32,768 cells in
all (``-t 2 -np 8 -c 32768``; edge-agent: ``n_parallel = 8``, ``n_ctx = 4096`` a slot). The run:
8 concurrent 128-token streams, then a ~1,100-token prompt and a second request sharing its
prefix (the figures of the issue's table). RSS is read from the process after the run.

* **edge-agent**: ``agent.cli run`` with the model as ``[model] path``, once without and once with
  the demo's MiniLM embedding model (``[embedding] path``; one embeddings request so its session is
  really built), for each KV type (quantized values need ``batch_invariant = false``).
* **peer**: a child process that loads the model and creates one context through llama-cpp-python's
  C API with the parameters ``llama-server -t 2 -np 8 -c 32768`` uses (n_ctx 32768, n_seq_max 8,
  a KV stream per sequence, SWA cache *not* full size, flash attention auto, n_batch 2048,
  n_ubatch 512, repacked weights) and decodes the same prompts greedily (128 tokens each, one
  sequence id each). Until bench/engine_bench.py has the real ``llama-server`` (branch f17a), this
  stands in for it.

    .venv/bin/python bench/kv_memory_bench.py                  # all types, markdown table
    .venv/bin/python bench/kv_memory_bench.py --types f16 q8_0
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import long_chat, prompt  # noqa: E402

MIB = 1 << 20
TOKENS = 128
TYPES = {  # name: (type_k, type_v, batch_invariant)
    "f16": ("f16", "f16", True),
    "q8_0-keys": ("q8_0", "f16", True),
    "q8_0": ("q8_0", "q8_0", False),
    "q4_0": ("q4_0", "q4_0", False),
}

PEER = r"""
import ctypes, json, sys
import psutil
import llama_cpp as l
path, type_k, type_v, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.stdin.read())
quiet = l.llama_log_callback(lambda *a: None)
l.llama_log_set(quiet, ctypes.c_void_p(0))
l.llama_backend_init()
model = l.llama_model_load_from_file(path.encode(), l.llama_model_default_params())
p = l.llama_context_default_params()
p.n_ctx, p.n_seq_max, p.kv_unified, p.swa_full = 32768, 8, False, False
p.n_batch, p.n_ubatch, p.n_threads, p.n_threads_batch = 2048, 512, 2, 2
p.type_k, p.type_v = type_k, type_v
ctx = l.llama_init_from_model(model, p)
vocab = l.llama_model_get_vocab(model)
batch = l.llama_batch_init(2048, 0, 1)
def decode(toks, pos0, seq):
    for start in range(0, len(toks), 512):
        part = toks[start:start + 512]
        batch.n_tokens = len(part)
        for i, t in enumerate(part):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + start + i, 1
            batch.seq_id[i][0], batch.logits[i] = seq, i == len(part) - 1
        assert l.llama_decode(ctx, batch) == 0
smpl = l.llama_sampler_init_greedy()
for seq, text in enumerate(prompts):
    buf = (l.llama_token * 4096)()
    n = l.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 4096, True, True)
    toks = list(buf[:n])
    l.llama_memory_seq_rm(l.llama_get_memory(ctx), seq % 8, 0, -1)
    decode(toks, 0, seq % 8)
    for k in range(tokens):
        t = l.llama_sampler_sample(smpl, ctx, -1)
        decode([t], n + k, seq % 8)
print(json.dumps({"rss": psutil.Process().memory_info().rss}))
"""


def peer_rss(model: Path, type_k: str, type_v: str, prompts: list[str]) -> int:
    from agent.engine.native import KV_GGML_TYPES

    args = [str(model), str(KV_GGML_TYPES[type_k]), str(KV_GGML_TYPES[type_v]), str(TOKENS)]
    out = subprocess.run(
        [sys.executable, "-c", PEER, *args],
        input=json.dumps(prompts),
        check=False,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer failed ({out.returncode}): {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


def stream(client: httpx.Client, body: dict[str, object]) -> None:
    r = client.post("/v1/completions", json=body)
    r.raise_for_status()


def edge_agent_rss(model: Path, kv: tuple[str, str, bool], embedding: bool, prompts: list[str]) -> int:
    state = Path(tempfile.mkdtemp(prefix="edge-kvmem-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env |= {
        "EDGE_AGENT_STATE_DIR": str(state),
        "EDGE_AGENT_MODEL__PATH": str(model),
        "EDGE_AGENT_ENGINE__N_THREADS": "2",
        "EDGE_AGENT_ENGINE__N_CTX": "4096",
        "EDGE_AGENT_ENGINE__N_PARALLEL": "8",
        "EDGE_AGENT_ENGINE__MAX_QUEUE": "64",
        "EDGE_AGENT_ENGINE__KV_CACHE_TYPE_K": kv[0],
        "EDGE_AGENT_ENGINE__KV_CACHE_TYPE_V": kv[1],
        "EDGE_AGENT_ENGINE__BATCH_INVARIANT": "true" if kv[2] else "false",
        "EDGE_AGENT_LOG__FORMAT": "json",
        "EDGE_AGENT_LOG__LEVEL": "warning",
    }
    if embedding:
        from agent.demo import embedding_model_files

        env |= {
            "EDGE_AGENT_EMBEDDING__PATH": str(embedding_model_files()[0]),
            "EDGE_AGENT_EMBEDDING__ID": "minilm",
        }
    sock = state / "run" / "edge-agent.sock"
    log = (state / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run"], stdout=log, stderr=log, env=env, cwd=ROOT
    )

    def client() -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=900
        )

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"edge-agent exited: {(state / 'daemon.log').read_text()[-2000:]}")
            try:
                with client() as c:
                    if c.get("/health").json().get("status") == "ok":
                        break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        with client() as c:
            if embedding:
                c.post(
                    "/v1/embeddings", json={"model": "minilm", "input": ["edge box"] * 32}
                ).raise_for_status()
        greedy = {"max_tokens": TOKENS, "temperature": 0}
        clients = [client() for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: stream(clients[i], {"prompt": prompts[i]} | greedy), range(8)))
        for c in clients:
            c.close()
        with client() as c:
            for text in prompts[8:]:
                stream(c, {"prompt": text} | greedy)
        return int(psutil.Process(proc.pid).memory_info().rss)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from agent.demo import demo_model_file

        model = demo_model_file(Path.home() / ".cache" / "edge-agent" / "test-models")
    chat = long_chat()
    prompts = [prompt(i) for i in range(8)] + [chat, chat.replace("one sentence", "three words")]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(f"cpu: {cpu}; model {model.name}; 8 slots x 4096 cells (-np 8 -c 32768), 2 threads")
    print("RSS after the run\n")
    print(
        "| KV type (K/V) | edge-agent | edge-agent + MiniLM | llama-server params (llama-cpp-python) "
        "| ratio | ratio with MiniLM |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.types:
        kv = TYPES[name]
        rows: dict[str, list[int]] = {"a": [], "e": [], "p": []}
        for _ in range(args.rounds):  # alternate the three processes within a round
            rows["p"].append(peer_rss(model, kv[0], kv[1], prompts))
            rows["a"].append(edge_agent_rss(model, kv, False, prompts))
            rows["e"].append(edge_agent_rss(model, kv, True, prompts))
        med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
        print(
            f"| {kv[0]}/{kv[1]}{'' if kv[2] else ' (batch_invariant false)'} | {med['a'] / MIB:.0f} MiB | "
            f"{med['e'] / MIB:.0f} MiB | {med['p'] / MIB:.0f} MiB | {med['a'] / med['p']:.2f} | "
            f"{med['e'] / med['p']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
