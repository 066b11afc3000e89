"""Inference benchmark: edge-agent against llama-cpp-python, same model, threads and context, one run.

Peers, measured in the same process run:

  (a) in-process ``llama_cpp.Llama.create_completion(stream=True)``;
  (b) ``python -m llama_cpp.server`` over TCP on 127.0.0.1 (needs ``pip install -e '.[bench]'``);
  (c) ``edge-agent run`` over its Unix socket (continuous batching, ``n_parallel`` slots).

Reported: single-stream generation tokens/s (after the first token), time to first token p50/p95
(distinct prompts, so no prefix reuse; the requests of (a) and (c) alternate, so that drift of a
shared machine weighs on both alike), aggregate tokens/s with 1, 4 and 8 concurrent streaming
clients and failed streams (an error, or fewer tokens than asked), and the time to first token of
the second turn of a ~1,000-token chat against the first. End-of-generation tokens are banned with
``logit_bias`` so every stream produces exactly ``--tokens`` tokens.

    .venv/bin/python bench/engine_bench.py --write
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import bench_parser, report  # noqa: E402

SECTION = "## Inference"

STARTS = ["Once", "In", "The", "A", "When", "After", "Every", "Long", "Under", "Before", "My", "Our"]
TOPICS = ["a lighthouse", "a robot", "the sea", "a small town", "a library", "the mountains"]


def prompt(i: int) -> str:
    return f"{STARTS[i % len(STARTS)]} upon {TOPICS[i % len(TOPICS)]}, story number {i}, there was"


@dataclass
class Stream:
    ok: bool
    ttft: float = 0.0
    gen_s: float = 0.0
    tokens: int = 0
    error: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


# -- clients ----------------------------------------------------------------------------------------


def sse_stream(client: httpx.Client, path: str, body: dict[str, Any], expect: int) -> Stream:
    """POST a streaming request; time the first text chunk and the last one."""
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    finish = None
    try:
        with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Stream(False, error=f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Stream(False, error=str(data["error"])[:200])
                for c in data.get("choices", []):
                    text = c.get("text") or (c.get("delta") or {}).get("content") or ""
                    if text:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
                    finish = c.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return Stream(False, error=f"{type(exc).__name__}: {exc}")
    tokens = expect if finish == "length" else chunks
    ok = tokens >= expect
    return Stream(ok, first - t0 if first else 0.0, last - first, tokens, "" if ok else f"{tokens} tokens")


def concurrent_streams(
    make_client: Callable[[], httpx.Client], n: int, tokens: int, bias: dict[str, float], offset: int
) -> tuple[float, list[Stream]]:
    """``n`` clients stream at once; aggregate = tokens of complete streams / wall time.

    The clients (and their connections) are made before the clock starts, so only the requests
    are timed (creating an httpx client costs tens of milliseconds of CPU).
    """
    clients = [make_client() for _ in range(n)]
    for c in clients:
        c.get("/v1/models")

    def one(i: int) -> Stream:
        body = {"prompt": prompt(offset + i), "max_tokens": tokens, "temperature": 0, "stream": True}
        return sse_stream(clients[i], "/v1/completions", body | {"logit_bias": bias}, tokens)

    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    return sum(r.tokens for r in results if r.ok) / wall, results


def long_chat(words: int = 700) -> str:
    base = (
        "Edge computing moves computation close to where data is produced, on small boxes in "
        "factories, shops, vehicles and homes, where networks are slow or absent. "
    )
    text = ""
    while len(text.split()) < words:
        text += base
    return text + "Summarise the paragraph above in one sentence."


def chat_turns(client: httpx.Client, bias: dict[str, float]) -> tuple[float, float, int]:
    """TTFT of turn 1 (a ~1,000-token user message) and turn 2 (history + a short question)."""
    msgs: list[dict[str, str]] = [{"role": "user", "content": long_chat()}]
    body: dict[str, Any] = {"max_tokens": 32, "temperature": 0, "stream": True, "logit_bias": bias}
    t1 = sse_stream(client, "/v1/chat/completions", body | {"messages": msgs}, 1)
    plain = client.post("/v1/chat/completions", json=body | {"messages": msgs, "stream": False}).json()
    reply = plain["choices"][0]["message"]["content"]
    n_prompt = plain.get("usage", {}).get("prompt_tokens", 0)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now in five words."}]
    t2 = sse_stream(client, "/v1/chat/completions", body | {"messages": msgs}, 1)
    return t1.ttft, t2.ttft, n_prompt


# -- peers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    client: httpx.Client, path: str, proc: subprocess.Popen[bytes], ok: Callable[[Any], bool]
) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with status {proc.returncode}")
        try:
            r = client.get(path)
            if r.status_code == 200 and ok(r.json()):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"peer not ready on {path}")


@contextmanager
def llama_cpp_server(model: Path, threads: int, n_ctx: int) -> Iterator[Callable[[], httpx.Client]]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", str(n_ctx), "--n_batch", "512",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def make() -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)

    try:
        with make() as c:
            wait_http(c, "/v1/models", proc, lambda _: True)
        yield make
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def edge_agent(model: Path, threads: int, n_ctx: int, parallel: int) -> Iterator[Callable[[], httpx.Client]]:
    state = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env |= {
        "EDGE_AGENT_STATE_DIR": str(state),
        "EDGE_AGENT_MODEL__PATH": str(model),
        "EDGE_AGENT_ENGINE__N_THREADS": str(threads),
        "EDGE_AGENT_ENGINE__N_CTX": str(n_ctx),
        "EDGE_AGENT_ENGINE__N_PARALLEL": str(parallel),
        "EDGE_AGENT_ENGINE__MAX_QUEUE": "64",
        "EDGE_AGENT_LOG__FORMAT": "json",
        "EDGE_AGENT_LOG__LEVEL": "warning",
    }
    sock = state / "run" / "edge-agent.sock"
    log = (state / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run"], stdout=log, stderr=log, env=env)

    def make() -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=600
        )

    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with make() as c:
            wait_http(c, "/health", proc, lambda h: h.get("status") == "ok")
        yield make
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# -- measurement ------------------------------------------------------------------------------------


class InProcess:
    """Peer (a): ``llama_cpp.Llama`` in this process, same model, threads, context and batch."""

    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )
        self.bias = {1: -100.0, 106: -100.0}

    def stream(self, i: int, n: int) -> Stream:
        t0 = time.perf_counter()
        first = last = 0.0
        for part in self.llm.create_completion(
            prompt(i), max_tokens=n, temperature=0, stream=True, logit_bias=self.bias
        ):
            if part["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
        return Stream(True, first - t0, last - first, n)

    def single(self, tokens: int, runs: int) -> float:
        self.stream(1000, 4)  # warm-up
        runs_ = [self.stream(i, tokens) for i in range(runs)]
        return statistics.median((s.tokens - 1) / s.gen_s for s in runs_)

    def close(self) -> None:
        self.llm.close()


def measure_server(
    make: Callable[[], httpx.Client],
    tokens: int,
    runs: int,
    ttft_runs: int,
    conc: list[int],
    beside: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """Single stream, TTFT, concurrent streams and chat turns of one HTTP peer.

    With ``beside`` (another peer's TTFT for prompt ``i``), the TTFT requests alternate with that
    peer's, the first of each pair swapping every time, so slow drift of the machine (other
    tenants, clock) weighs on both sides alike; its times are returned as ``beside_ttft``.
    """
    bias = {"1": -100.0, "106": -100.0}
    body: dict[str, Any] = {"max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": bias}
    out: dict[str, Any] = {"agg": {}, "failed": {}}
    with make() as c:
        sse_stream(c, "/v1/completions", body | {"prompt": prompt(1000), "max_tokens": 4}, 4)  # warm-up
        single = [sse_stream(c, "/v1/completions", body | {"prompt": prompt(i)}, tokens) for i in range(runs)]
        ok = [s for s in single if s.ok]
        out["single"] = statistics.median((s.tokens - 1) / s.gen_s for s in ok) if ok else 0.0
        out["ttft"], out["beside_ttft"] = [], []
        for i in range(ttft_runs):
            if beside is not None and i % 2:
                out["beside_ttft"].append(beside(100 + i))
            req = body | {"prompt": prompt(100 + i), "max_tokens": 4}
            out["ttft"].append(sse_stream(c, "/v1/completions", req, 4).ttft)
            if beside is not None and not i % 2:
                out["beside_ttft"].append(beside(100 + i))
    for n in conc:
        agg, results = concurrent_streams(make, n, tokens, bias, 200 + 10 * n)
        out["agg"][n] = agg
        out["failed"][n] = sum(not r.ok for r in results)
    with make() as c:
        try:
            out["chat"] = chat_turns(c, bias)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            out["chat"] = None
            print(f"chat turns failed: {exc}", file=sys.stderr)
    return out


def fmt_ms(v: float) -> str:
    return f"{v * 1000:.0f}"


def render(args: argparse.Namespace, a: dict[str, Any], b: dict[str, Any] | None, c: dict[str, Any]) -> str:
    conc = args.concurrency
    lines = [
        SECTION,
        "",
        f"Gemma 3 270M Q4_K_M, {args.threads} threads, context {args.ctx}, {args.tokens}-token streaming "
        f"completions (end-of-generation banned), edge-agent with {args.parallel} slots (a {args.ctx}-token "
        "KV stream each, default settings otherwise); one run on "
        f"{os.cpu_count()} cores, load average at start {args.load:.2f}. Reproduce with "
        "`pip install -e '.[bench]'` then:",
        "",
        "```",
        "    " + " ".join(["python bench/engine_bench.py", *args.argv]).strip(),
        "```",
        "",
        "| | single stream tok/s | TTFT p50 ms | TTFT p95 ms | "
        + " | ".join(f"{n} streams tok/s (failed)" for n in conc)
        + " |",
        "|---|---|---|---|" + "---|" * len(conc),
        f"| (a) in-process `Llama.create_completion` | {a['single']:.1f} | {fmt_ms(pct(a['ttft'], 0.5))} | "
        f"{fmt_ms(pct(a['ttft'], 0.95))} | " + " | ".join("n/a" for _ in conc) + " |",
    ]
    for name, r in (("(b) `python -m llama_cpp.server` (TCP)", b), ("(c) edge-agent (Unix socket)", c)):
        if r is None:
            continue
        cells = " | ".join(f"{r['agg'][n]:.1f} ({r['failed'][n]}/{n})" for n in conc)
        p50, p95 = fmt_ms(pct(r["ttft"], 0.5)), fmt_ms(pct(r["ttft"], 0.95))
        lines.append(f"| {name} | {r['single']:.1f} | {p50} | {p95} | {cells} |")
    lines += ["", "Second turn of a chat whose first turn is a ~1,000-token user message (TTFT, ms):", ""]
    lines += ["| | prompt tokens | turn 1 | turn 2 | turn 2 / turn 1 |", "|---|---|---|---|---|"]
    for name, r in (("(b) llama_cpp.server", b), ("(c) edge-agent", c)):
        if r and r.get("chat"):
            t1, t2, n = r["chat"]
            lines.append(f"| {name} | {n} | {fmt_ms(t1)} | {fmt_ms(t2)} | {t2 / t1:.2f} |")
    lines += ["", "Goals (ratios from this run):", ""]
    top = max(conc)
    goals = [
        (
            "TTFT p50 over the socket - (a)",
            f"{(pct(c['ttft'], 0.5) - pct(a['ttft'], 0.5)) * 1000:+.1f} ms",
            "<= +10 ms",
        )
    ]
    if b is not None:
        goals.insert(0, ("single stream (c) / (b)", f"{c['single'] / b['single']:.2f}x", ">= 1.2x"))
        goals.insert(
            1,
            (
                f"{top}-stream aggregate (c) / single (b)",
                f"{c['agg'][top] / b['single']:.2f}x",
                ">= 2.5x, 0 failed",
            ),
        )
    if c.get("chat"):
        t1, t2, _ = c["chat"]
        goals.append(("2nd chat turn TTFT / 1st (c)", f"{t2 / t1:.2f}", "<= 0.3"))
    lines += ["| goal | measured | target |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {t} |" for g, m, t in goals]
    lines += [
        "",
        "What bounds these figures (llama.cpp alone: the Decode ceiling section) and why the defaults "
        "trade some speed for batch-invariant output: docs/engine.md, Performance.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = bench_parser(__doc__, SECTION)
    ap.add_argument("--model", type=Path, help="GGUF file (default: the demo Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="single-stream runs per peer")
    ap.add_argument("--ttft-runs", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=8, help="edge-agent slots")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--skip-server", action="store_true", help="leave out (b)")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.load = os.getloadavg()[0]
    if args.model is None:
        from agent.demo import demo_model_file

        args.model = demo_model_file(Path.home() / ".cache" / "edge-agent" / "test-models")
    print(f"model {args.model}, load {args.load:.2f}", file=sys.stderr)
    peer = InProcess(args.model, args.threads, args.ctx)
    try:
        a: dict[str, Any] = {"single": peer.single(args.tokens, args.runs)}
        print(f"(a) {a['single']:.1f} tok/s", file=sys.stderr)
        b = None
        if not args.skip_server:
            with llama_cpp_server(args.model, args.threads, args.ctx) as make:
                b = measure_server(make, args.tokens, args.runs, args.ttft_runs, args.concurrency)
            print(f"(b) {b}", file=sys.stderr)
        with edge_agent(args.model, args.threads, args.ctx, args.parallel) as make:
            beside = lambda i: peer.stream(i, 4).ttft  # noqa: E731
            c = measure_server(make, args.tokens, args.runs, args.ttft_runs, args.concurrency, beside)
        a["ttft"] = c.pop("beside_ttft")
    finally:
        peer.close()
    print(f"(a) ttft {a['ttft']}", file=sys.stderr)
    print(f"(c) {c}", file=sys.stderr)
    report(SECTION, render(args, a, b, c), write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
