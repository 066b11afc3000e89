"""Inference benchmark: edge-agent beside llama.cpp's own C++ ``llama-server``, same model, one run.

The peer is ``llama-server`` built from the llama.cpp source vendored in the installed
llama-cpp-python, with the same build profile and flags (``bench/llama_server.py`` builds it once
into ``~/.cache/edge-agent/llama-server/`` and reuses it; its docstring says how). Both serve
Gemma 3 270M Q4_K_M (the demo's completion model) with ``--threads`` threads and the same slots:
edge-agent ``n_parallel`` slots of ``n_ctx`` 4,096 tokens each (a KV stream per slot), llama-server
``-t 2 -np 8 -c 32768`` (8 x 4,096, no unified KV: the same layout); the 16-stream row starts both
again with 16 slots. Everything else is each server's default. edge-agent is reached over its Unix
socket, llama-server over TCP on 127.0.0.1.

Rows (``--only`` picks some; ``rss`` always comes with whatever runs):

``single``    tokens/s of one 128-token stream after its first token (median of ``--runs``)
``ttft``      time to first token p50 of short distinct prompts (no prefix to reuse)
``streams``   aggregate tokens/s of 4 and 8 concurrent 128-token streams, and failed streams
``streams16`` the same with 16 streams against 16-slot servers
``chat``      TTFT of a first request with a ~1,100-token prompt, then of a second request with the
              same prefix and a different question (what a RAG or chat app sends all day)
``prefix``    the same pair at 500, 1,000 and 2,000 prefix tokens (second-request TTFT)
``rss``       resident memory of each server (process tree) after its rows ran

Every stream asks for exactly ``--tokens`` tokens: end-of-generation tokens are banned with
``logit_bias``, and a stream that ends early or errs counts as failed. Prompts are raw text on
``/v1/completions`` so both servers see identical tokens (no chat template in between); long
prompts are cut to their token counts with the model's own tokenizer (``vocab_only``).

Rounds alternate the order of the servers (round 1 edge-agent first, round 2 llama-server first,
...); each figure is the median over ``--rounds`` rounds (default 2). ``--old-bar`` adds
``python -m llama_cpp.server`` (the issue-5 peer) for one round of ``single`` and ``streams``.
``--quick`` is one round with fewer repeats. Time: ``--tokens 32`` took 22 minutes for 2 rounds on
2 cores shared with other engineers' benchmarks (load average 5-8, every decode 10-20x slower than
on a quiet machine); the llama.cpp threads spin at their barriers, so a busy machine slows both
servers far more than the load average suggests, and the per-round figures show how much.

    .venv/bin/python bench/engine_bench.py --write
    .venv/bin/python bench/engine_bench.py --only prefix,streams --rounds 3
    .venv/bin/python bench/engine_bench.py --quick --only streams16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import bench_parser, report  # noqa: E402

SECTION = "## Inference"
ROWS = ("single", "ttft", "streams", "streams16", "chat", "prefix")
PEERS = ("edge-agent", "llama-server")
EOG_BIAS = {"1": -100.0, "106": -100.0}
"""Gemma 3's ``<eos>`` and ``<end_of_turn>``: banned so every stream runs ``--tokens`` tokens."""
REQUEST_TIMEOUT_S = 180.0

STARTS = ["Once", "In", "The", "A", "When", "After", "Every", "Long", "Under", "Before", "My", "Our"]
TOPICS = ["a lighthouse", "a robot", "the sea", "a small town", "a library", "the mountains"]
SUBJECTS = ["harbours", "orchards", "railways", "glaciers", "markets", "observatories", "bridges"]


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
    """POST a streaming request; time the first text chunk and the last one.

    ``ok`` only when the stream ran ``expect`` tokens (``finish_reason == "length"``) without error.
    A kept-alive connection the server closed meanwhile (nothing received: llama-server's HTTP
    library closes idle or much-used ones) is retried once on a new connection, timed afresh.
    """
    for _ in range(2):
        result = sse_once(client, path, body, expect)
        if not result.error.startswith("RemoteProtocolError: Server disconnected without sending"):
            break
        print("  (a kept-alive connection was closed by the server; retried)", file=sys.stderr)
    return result


def sse_once(client: httpx.Client, path: str, body: dict[str, Any], expect: int) -> Stream:
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
    ok = tokens >= expect and first > 0
    return Stream(ok, first - t0 if first else 0.0, last - first, tokens, "" if ok else f"{tokens} tokens")


def completion(client: httpx.Client, text: str, tokens: int) -> Stream:
    body = {"prompt": text, "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": EOG_BIAS}
    return sse_stream(client, "/v1/completions", body, tokens)


def concurrent_streams(
    make: Callable[[], httpx.Client], n: int, tokens: int, offset: int
) -> tuple[float, int]:
    """``n`` clients stream at once: (tokens of complete streams / wall time, failed streams).

    The clients and their connections are made before the clock starts, so only requests are timed.
    """
    clients = [make() for _ in range(n)]
    for c in clients:
        c.get("/v1/models")
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(lambda i: completion(clients[i], prompt(offset + i), tokens), range(n)))
            wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    for r in results:
        if not r.ok:
            print(f"  failed stream: {r.error}", file=sys.stderr)
    return sum(r.tokens for r in results if r.ok) / wall, sum(not r.ok for r in results)


class Texts:
    """Long prompts of an exact token count, cut with the model's tokenizer (``vocab_only``)."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=True, special=False))

    def prefix(self, tokens: int, seed: int) -> str:
        """About ``tokens`` tokens (BOS included) of prose, distinct from any other ``seed``'s from the
        first word on, ending at a sentence boundary."""
        subject = SUBJECTS[seed % len(SUBJECTS)]
        sentences, text, i = [], f"Report {seed} on {subject}.", 0
        while self.count(text) < tokens:
            i += 1
            sentences.append(
                f" Section {i}: the {subject} of district {seed * 100 + i} were surveyed in season "
                f"{i % 4 + 1}, and the inspectors noted {i * 7 % 13 + 2} repairs and "
                f"{i * 3 % 5 + 1} new works."
            )
            text += sentences[-1]
        return text

    def close(self) -> None:
        self.llm.close()


QUESTIONS = ("\n\nQuestion: Which district needed the most repairs?\nAnswer:",
             "\n\nQuestion: How many seasons does the report cover?\nAnswer:")  # fmt: skip


def prefix_pair(client: httpx.Client, text: str) -> tuple[float, float]:
    """TTFT of ``text`` + question 1 (nothing cached), then of ``text`` + question 2 (same prefix)."""
    first = completion(client, text + QUESTIONS[0], 4)
    second = completion(client, text + QUESTIONS[1], 4)
    if not (first.ok and second.ok):
        raise RuntimeError(f"prefix pair failed: {first.error or second.error}")
    return first.ttft, second.ttft


# -- servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    make: Callable[[], httpx.Client], path: str, proc: subprocess.Popen[bytes], ok: Callable[[Any], bool]
) -> None:
    deadline = time.monotonic() + 180
    with make() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                r = client.get(path)
                if r.status_code == 200 and ok(r.json()):
                    return
            except (httpx.HTTPError, ValueError, OSError):
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server not ready on {path}")


@dataclass
class Server:
    make: Callable[[], httpx.Client]
    pid: int
    log: Path


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (VmRSS from /proc), MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@contextmanager
def run_process(cmd: list[str], env: dict[str, str] | None, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tcp_client(port: int) -> Callable[[], httpx.Client]:
    return lambda: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S)


@contextmanager
def llama_server(
    binary: Path, model: Path, threads: int, slots: int, ctx: int, kv_type: str = "f16"
) -> Iterator[Server]:
    """``llama-server -t T -np N -c N*ctx`` (N slots of ``ctx`` tokens), defaults otherwise; a
    quantized ``kv_type`` adds ``-ctk T -ctv T -fa on`` (a quantized V cache needs flash attention)."""
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-np", str(slots), "-c", str(slots * ctx), "--no-webui"]  # fmt: skip
    if kv_type != "f16":
        cmd += ["-ctk", kv_type, "-ctv", kv_type, "-fa", "on"]
    log = Path(tempfile.mkdtemp(prefix="llama-server-")) / "server.log"
    with run_process(cmd, None, log) as proc:
        make = tcp_client(port)
        wait_http(make, "/health", proc, lambda h: h.get("status") == "ok")
        yield Server(make, proc.pid, log)


@contextmanager
def llama_cpp_server(model: Path, threads: int, slots: int, ctx: int) -> Iterator[Server]:
    """``python -m llama_cpp.server`` (one sequence at a time; ``slots`` is not used)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", str(ctx), "--n_batch", "512",
    ]  # fmt: skip
    log = Path(tempfile.mkdtemp(prefix="llama-cpp-server-")) / "server.log"
    with run_process(cmd, None, log) as proc:
        make = tcp_client(port)
        wait_http(make, "/v1/models", proc, lambda _: True)
        yield Server(make, proc.pid, log)


@contextmanager
def edge_agent(
    model: Path, threads: int, slots: int, ctx: int, extra: Sequence[str] = ()
) -> Iterator[Server]:
    """``edge-agent run`` serving ``model`` alone, ``slots`` slots of ``ctx`` tokens, defaults
    otherwise; ``extra``: more ``EDGE_AGENT_...=VALUE`` settings (``--agent-env``)."""
    state = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "EDGE_AGENT_STATE_DIR": str(state),
        "EDGE_AGENT_MODEL__PATH": str(model),
        "EDGE_AGENT_ENGINE__N_THREADS": str(threads),
        "EDGE_AGENT_ENGINE__N_CTX": str(ctx),
        "EDGE_AGENT_ENGINE__N_PARALLEL": str(slots),
        "EDGE_AGENT_ENGINE__MAX_QUEUE": "64",
        "EDGE_AGENT_LOG__FORMAT": "json",
        "EDGE_AGENT_LOG__LEVEL": "warning",
    }
    env |= dict(item.split("=", 1) for item in extra)
    sock = state / "run" / "edge-agent.sock"
    with run_process([sys.executable, "-m", "agent.cli", "run"], env, state / "daemon.log") as proc:

        def make() -> httpx.Client:
            transport = httpx.HTTPTransport(uds=str(sock))
            return httpx.Client(transport=transport, base_url="http://localhost", timeout=REQUEST_TIMEOUT_S)

        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_http(make, "/health", proc, lambda h: h.get("status") == "ok")
        yield Server(make, proc.pid, state / "daemon.log")


# -- measurement ------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Per peer: metric name -> one value per round (and failures summed over rounds)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens of the last round's long prompts (``chat``: with question 1; ``prefixN``: the prefix)."""

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        v = self.values.get(metric)
        return statistics.median(v) if v else None


def measure(server: Server, args: argparse.Namespace, texts: Texts, fig: Figures, rnd: int) -> None:
    """The rows of ``args.only`` (except streams16) against one running 8-slot server."""
    rows, make = args.only, server.make
    with make() as c:
        completion(c, prompt(1000 + rnd), 4)  # warm-up
        progress("warm")
        if "single" in rows:
            runs = [completion(c, prompt(10 * rnd + i), args.tokens) for i in range(args.runs)]
            ok = [s for s in runs if s.ok]
            fig.failed["single"] = fig.failed.get("single", 0) + len(runs) - len(ok)
            if ok:
                fig.add("single", statistics.median((s.tokens - 1) / s.gen_s for s in ok))
            progress("single")
        if "ttft" in rows:
            ttfts = [completion(c, prompt(100 + 50 * rnd + i), 4) for i in range(args.ttft_runs)]
            fig.add("ttft", pct([s.ttft for s in ttfts if s.ok], 0.5))
            progress("ttft")
    if "streams" in rows:
        for n in (4, 8):
            agg, failed = concurrent_streams(make, n, args.tokens, 300 + 100 * rnd + 10 * n)
            fig.add(f"streams{n}", agg)
            fig.failed[f"streams{n}"] = fig.failed.get(f"streams{n}", 0) + failed
            fig.streams[f"streams{n}"] = fig.streams.get(f"streams{n}", 0) + n
            progress(f"streams{n}")
    with make() as c:
        if "chat" in rows:
            text = texts.prefix(args.chat_tokens, 10 * rnd + 1)
            fig.prompt_tokens["chat"] = texts.count(text + QUESTIONS[0])
            first, second = prefix_pair(c, text)
            fig.add("chat_first", first)
            fig.add("chat_second", second)
            progress("chat")
        if "prefix" in rows:
            for k, n in enumerate(args.prefix_tokens):
                text = texts.prefix(n, 10 * rnd + 2 + k)
                fig.prompt_tokens[f"prefix{n}"] = texts.count(text)
                first, second = prefix_pair(c, text)
                fig.add(f"prefix{n}_first", first)
                fig.add(f"prefix{n}_second", second)
                progress(f"prefix{n}")
    fig.add("rss", tree_rss_mib(server.pid))


def progress(step: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {step}", file=sys.stderr, flush=True)


def measure16(server: Server, args: argparse.Namespace, fig: Figures, rnd: int) -> None:
    with server.make() as c:
        completion(c, prompt(2000 + rnd), 4)  # warm-up
    agg, failed = concurrent_streams(server.make, 16, args.tokens, 600 + 100 * rnd)
    fig.add("streams16", agg)
    fig.failed["streams16"] = fig.failed.get("streams16", 0) + failed
    fig.streams["streams16"] = fig.streams.get("streams16", 0) + 16
    fig.add("rss16", tree_rss_mib(server.pid))


# -- report -----------------------------------------------------------------------------------------


def version_of(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0].removeprefix("version: ").strip() if lines else "unknown"


def git_commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table_rows(args: argparse.Namespace, tokens: dict[str, int]) -> list[tuple[str, str, str, bool]]:
    """(label, metric, unit, higher is better) of every figure the selected rows produce; ``tokens``
    are the long prompts' measured token counts."""
    out: list[tuple[str, str, str, bool]] = []
    rows = args.only
    if "single" in rows:
        out.append(("single stream tok/s", "single", "tok/s", True))
    if "ttft" in rows:
        out.append(("TTFT p50, short prompt", "ttft", "ms", False))
    if "streams" in rows:
        out += [(f"{n} streams aggregate tok/s", f"streams{n}", "tok/s", True) for n in (4, 8)]
    if "streams16" in rows:
        out.append(("16 streams aggregate tok/s (16 slots)", "streams16", "tok/s", True))
    if "chat" in rows:
        n_chat = f"{tokens['chat']:,}" if "chat" in tokens else f"~{args.chat_tokens:,}"
        out.append((f"first request, {n_chat}-token prompt, TTFT", "chat_first", "ms", False))
        out.append(("second request, same prefix + a different question, TTFT", "chat_second", "ms", False))
    if "prefix" in rows:
        for n in args.prefix_tokens:
            size = f"{tokens.get(f'prefix{n}', n):,}"
            out.append((f"prefix of {size} tokens: first request TTFT", f"prefix{n}_first", "ms", False))
            out.append((f"prefix of {size} tokens: second request TTFT", f"prefix{n}_second", "ms", False))
    out.append(("RSS after the run, MiB (8 slots)", "rss", "MiB", False))
    if "streams16" in rows:
        out.append(("RSS after the run, MiB (16 slots)", "rss16", "MiB", False))
    return out


def cell(fig: Figures, metric: str, unit: str) -> str:
    v = fig.median(metric)
    if v is None:
        return "n/a"
    text = f"{v * 1000:,.0f} ms" if unit == "ms" else f"{v:,.1f}"
    if metric in fig.streams:
        text += f" ({fig.failed.get(metric, 0)}/{fig.streams[metric]} failed)"
    return text


def section(args: argparse.Namespace) -> str:
    """The doc section of this run: one for the default KV cache, one per quantized type."""
    return SECTION if args.kv_type == "f16" else f"{SECTION}, KV cache {args.kv_type}"


def render(args: argparse.Namespace, figs: dict[str, Figures], meta: dict[str, str]) -> str:
    ea, ls = figs["edge-agent"], figs["llama-server"]
    kv = (
        f" KV cache `{args.kv_type}` for keys and values on both (edge-agent `kv_cache_type_k/v`, "
        f"llama-server `-ctk {args.kv_type} -ctv {args.kv_type} -fa on`)."
        if args.kv_type != "f16"
        else ""
    )
    lines = [
        section(args),
        "",
        f"{meta['cpu']}, {os.cpu_count()} cores (shared), Gemma 3 270M Q4_K_M, {args.threads} threads, "
        f"{args.tokens}-token streaming completions (end-of-generation banned). edge-agent "
        f"{meta['commit']} over its Unix socket, {args.slots} slots of {args.ctx:,} tokens (a KV stream "
        "each; default settings otherwise) against llama.cpp's C++ `llama-server` "
        f"({meta['server_version']}, from the llama.cpp vendored in llama-cpp-python {meta['llama_cpp']}, "
        f"build profile `{meta['profile']}`, the venv's flags: `bench/llama_server.py`) over TCP, "
        f"`-t {args.threads} -np {args.slots} -c {args.slots * args.ctx}`; the 16-stream row restarts "
        f"both with 16 slots (`-np 16 -c {16 * args.ctx}`). Medians of {args.rounds} alternating "
        f"round(s); load average {meta['load_start']} at the start, {meta['load_end']} at the end; "
        f"{meta['minutes']} minutes.{kv} Reproduce with:",
        "",
        "```",
        "    " + " ".join(["python bench/engine_bench.py", *args.argv]).strip(),
        "```",
        "",
        "| | edge-agent | llama-server | ratio edge-agent / llama-server | better |",
        "|---|---|---|---|---|",
    ]
    for label, metric, unit, higher in table_rows(args, ea.prompt_tokens):
        a, b = ea.median(metric), ls.median(metric)
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        better = "higher" if higher else "lower"
        a_cell, b_cell = cell(ea, metric, unit), cell(ls, metric, unit)
        lines.append(f"| {label} | {a_cell} | {b_cell} | {ratio} | {better} |")
    rounds = []
    for name, fig in figs.items():
        per = "; ".join(
            f"{m} "
            + ", ".join(
                f"{v * 1000:.0f}" if "ttft" in m or "first" in m or "second" in m else f"{v:.1f}" for v in vs
            )
            for m, vs in fig.values.items()
        )
        rounds.append(f"{name}: {per}")
    lines += ["", "Per round (ms for times, tok/s, MiB): " + " | ".join(rounds) + "."]
    old = figs.get("llama_cpp.server")
    if old is not None and old.median("single"):
        lines += ["", "The issue-5 bar, `python -m llama_cpp.server` over TCP (one round):", ""]
        lines += ["| goal | measured | target |", "|---|---|---|"]
        s_ea, s_old = ea.median("single"), old.median("single")
        if s_ea is not None and s_old:
            lines.append(f"| single stream edge-agent / llama_cpp.server | {s_ea / s_old:.2f}x | >= 1.2x |")
        e8 = ea.median("streams8")
        if e8 is not None and s_old:
            goal = ">= 2.5x, 0 failed"
            name = "8-stream aggregate edge-agent / single llama_cpp.server"
            lines.append(f"| {name} | {e8 / s_old:.2f}x | {goal} |")
        figures = f"{cell(old, 'single', 'tok/s')}, {cell(old, 'streams8', 'tok/s')}"
        lines.append(f"| llama_cpp.server single stream, 8 streams | {figures} | |")
    lines += [
        "",
        "Prompts are raw text on `/v1/completions`, cut to their token count with the model's "
        "tokenizer, so both servers see the same tokens; the prefix pairs send a prefix + question 1 "
        "(nothing cached), then the same prefix + question 2. RSS is the server's process tree. What "
        "bounds these figures (llama.cpp alone: the Decode ceiling section) and why the defaults trade "
        "some speed for batch-invariant output: docs/engine.md, Performance.",
    ]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = bench_parser(__doc__, SECTION)
    ap.add_argument("--model", type=Path, help="GGUF file (default: the demo Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096, help="tokens per slot")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="single-stream runs per round")
    ap.add_argument("--ttft-runs", type=int, default=10)
    ap.add_argument("--chat-tokens", type=int, default=1100)
    ap.add_argument(
        "--prefix-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[500, 1000, 2000]
    )
    ap.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(ROWS),
        help=f"comma-separated rows out of {','.join(ROWS)} (default all)",
    )
    ap.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="EDGE_AGENT_X=V",
        help="a setting for edge-agent's daemon (repeatable), e.g. EDGE_AGENT_ENGINE__PROMPT_CACHE=false",
    )
    ap.add_argument(
        "--kv-type",
        choices=["f16", "q8_0", "q4_0"],
        default="f16",
        help="KV cache type for keys and values of both servers (its own section of the doc)",
    )
    ap.add_argument("--quick", action="store_true", help="one round, 2 single runs, 5 TTFT runs")
    ap.add_argument("--old-bar", action="store_true", help="also python -m llama_cpp.server, one round")
    ap.add_argument(
        "--rebuild-server", action="store_true", help="rebuild llama-server (bench/llama_server.py)"
    )
    args = ap.parse_args()
    unknown = [r for r in args.only if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    extras = ("uvicorn", "fastapi", "sse_starlette", "starlette_context")
    if args.old_bar and not all(importlib.util.find_spec(m) for m in extras):
        ap.error("--old-bar runs python -m llama_cpp.server: pip install -e '.[bench]' first")
    if args.kv_type != "f16":
        args.agent_env += [
            f"EDGE_AGENT_ENGINE__KV_CACHE_TYPE_K={args.kv_type}",
            f"EDGE_AGENT_ENGINE__KV_CACHE_TYPE_V={args.kv_type}",
        ]
    bad = [e for e in args.agent_env if not e.startswith("EDGE_AGENT_") or "=" not in e]
    if bad:
        ap.error(f"--agent-env takes EDGE_AGENT_NAME=VALUE, not {', '.join(bad)}")
    if args.quick:
        args.rounds, args.runs, args.ttft_runs = 1, 2, 5
    args.argv = sys.argv[1:]
    return args


def main() -> int:
    args = parse_args()
    import llama_server as builder

    binary, record = builder.ensure(args.rebuild_server)
    if args.model is None:
        from agent.demo import demo_model_file

        args.model = demo_model_file(Path.home() / ".cache" / "edge-agent" / "test-models")
    t_start, load_start = time.monotonic(), os.getloadavg()[0]
    print(f"model {args.model}, llama-server {binary}, load {load_start:.2f}", file=sys.stderr)
    servers: dict[str, Callable[..., Any]] = {
        "edge-agent": lambda *a: edge_agent(*a, extra=args.agent_env),
        "llama-server": lambda *a: llama_server(binary, *a, kv_type=args.kv_type),
    }
    figs = {name: Figures() for name in PEERS}
    texts = Texts(args.model)
    try:
        for rnd in range(args.rounds):
            order = PEERS if rnd % 2 == 0 else PEERS[::-1]
            for name in order:
                print(f"round {rnd + 1}: {name}", file=sys.stderr, flush=True)
                with servers[name](args.model, args.threads, args.slots, args.ctx) as server:
                    measure(server, args, texts, figs[name], rnd)
                if "streams16" in args.only:
                    with servers[name](args.model, args.threads, 16, args.ctx) as server:
                        measure16(server, args, figs[name], rnd)
                print(f"  {figs[name].values}", file=sys.stderr, flush=True)
        if args.old_bar:
            figs["llama_cpp.server"] = old = Figures()
            old_args = argparse.Namespace(**vars(args) | {"only": ["single", "streams"]})
            with llama_cpp_server(args.model, args.threads, 1, args.ctx) as server:
                measure(server, old_args, texts, old, 0)
    finally:
        texts.close()
    meta = {
        "cpu": cpu_name(),
        "commit": git_commit(),
        "server_version": version_of(binary),
        "llama_cpp": str(record.get("llama_cpp_version")),
        "profile": str(record.get("profile")),
        "load_start": f"{load_start:.2f}",
        "load_end": f"{os.getloadavg()[0]:.2f}",
        "minutes": f"{(time.monotonic() - t_start) / 60:.1f}",
    }
    report(section(args), render(args, figs, meta), write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
