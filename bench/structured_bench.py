"""Structured-output benchmark: schema-constrained generation against unconstrained, against
llama.cpp's own C++ ``llama-server`` and against llama-cpp-python's JSON Schema path, same model,
threads and prompts, one run.

Runs, over the same ``--prompts`` varied extraction prompts (people described in prose: name, age,
city, birth date, skills), greedy, one request at a time:

  (a) edge-agent over its Unix socket, ``response_format: json_schema`` (our grammar);
  (b) edge-agent, the same prompts without ``response_format`` (unconstrained);
  (c) in-process ``llama_cpp.Llama.create_chat_completion(response_format={"type": "json_object",
      "schema": ...})``: llama-cpp-python's converter and grammar;
  (d) ``python -m llama_cpp.server`` over TCP on 127.0.0.1, the same ``response_format`` (needs the
      ``bench`` extras, ``pip install -e '.[bench]'``; left out when they are missing);
  (e) llama.cpp's C++ ``llama-server`` over TCP (built like our llama-cpp-python by
      ``bench/llama_server.py``, cached), ``response_format: json_schema`` exactly as (a) sends it:
      THE peer of the >= 1x goal.

(a) and (e) run ``--rounds`` rounds in alternating order; (b), (c), (d) once (``--skip`` leaves
peers out). Reported: generation tokens/s after the first token (median over the prompts; for (a)
and (e) the median of the per-round medians), and the share of answers that parse as JSON and
validate against the schema (``jsonschema_rs``, formats checked).

    .venv/bin/python bench/structured_bench.py --write
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import bench_parser, report  # noqa: E402

SECTION = "## Structured output"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30},
        "born": {"type": "string", "format": "date"},
        "skills": {
            "type": "array",
            "items": {"enum": ["cooking", "chess", "piano", "python", "painting", "running"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "city", "born", "skills"],
    "additionalProperties": False,
}
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Nikola Tesla", "Rosalind Franklin",
         "Carl Sagan", "Hedy Lamarr", "Katherine Johnson", "Tim Berners-Lee"]  # fmt: skip
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome"]
SKILLS = ["cooking", "chess", "piano", "python", "painting", "running"]
STYLES = [
    "{name} is {age} years old and lives in {city}. Born on {born}, {name} enjoys {s1} and {s2}.",
    "Meet {name} from {city}: {age}, born {born}, good at {s1}.",
    "Profile. Name: {name}. Age: {age}. Home: {city}. Date of birth: {born}. Hobbies: {s1}, {s2}.",
    "In {city} lives {name}, aged {age} (born {born}), who loves {s2} more than {s1}.",
    "{name}, {age}, {city}. Birthday {born}. Skills: {s1}.",
]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        fields = {
            "name": NAMES[i % len(NAMES)],
            "age": 20 + (i * 7) % 60,
            "city": CITIES[i % len(CITIES)],
            "born": f"{1950 + i % 50}-{1 + i % 12:02d}-{1 + (i * 3) % 28:02d}",
            "s1": SKILLS[i % len(SKILLS)],
            "s2": SKILLS[(i + 2) % len(SKILLS)],
        }
        text = STYLES[i % len(STYLES)].format(**fields)
        out.append(f"{text}\nExtract name, age, city, born (a date) and skills as JSON.")
    return out


def valid(text: str) -> bool:
    import jsonschema_rs

    try:
        value = json.loads(text)
    except ValueError:
        return False
    return bool(jsonschema_rs.validator_for(SCHEMA, validate_formats=True).is_valid(value))


def timed_stream(chunks: Any, text_of: Any) -> tuple[str, int, float]:
    """(text, pieces, seconds after the first piece) of a stream."""
    parts: list[str] = []
    first = last = None
    for chunk in chunks:
        piece = text_of(chunk)
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            parts.append(piece)
    return "".join(parts), len(parts), (last - first) if first and last else 0.0


def run_agent(
    socket_path: Path, texts: list[str], model: str, constrained: bool, max_tokens: int
) -> list[tuple[str, float]]:
    from tests.daemon import openai_client

    out = []
    with openai_client(socket_path) as client:
        for text in texts:
            extra: dict[str, Any] = {}
            if constrained:
                extra["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
                }
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
            usage: list[int] = []

            def piece(chunk: Any, usage: list[int] = usage) -> str:
                if chunk.usage is not None:
                    usage.append(chunk.usage.completion_tokens)
                return "".join(c.delta.content or "" for c in chunk.choices)

            answer, _, seconds = timed_stream(stream, piece)
            tokens = usage[-1] if usage else 0
            out.append((answer, (tokens - 1) / seconds if seconds > 0 and tokens > 1 else 0.0))
    return out


def run_llama_cpp(path: Path, texts: list[str], threads: int, max_tokens: int) -> list[tuple[str, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_ctx=2048, verbose=False)
    out = []
    for text in texts:
        stream = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}],
            response_format={"type": "json_object", "schema": SCHEMA},
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        answer, _, seconds = timed_stream(
            stream, lambda c: c["choices"][0]["delta"].get("content") or "" if c["choices"] else ""
        )
        tokens = len(llm.tokenize(answer.encode(), add_bos=False, special=False))
        out.append((answer, (tokens - 1) / seconds if seconds > 0 and tokens > 1 else 0.0))
    llm.close()
    return out


def server_stream(
    client: Any, texts: list[str], max_tokens: int, response_format: dict[str, Any]
) -> list[tuple[str, float]]:
    """Stream each prompt through an HTTP peer's ``/v1/chat/completions``: (answer, generation tok/s).

    Tokens are the final usage's ``completion_tokens`` when the peer reports it, else the streamed
    pieces (one per token)."""
    out = []
    for text in texts:
        body = {
            "messages": [{"role": "user", "content": text}],
            "response_format": response_format,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for attempt in range(2):
            try:
                out.append(server_once(client, body))
                break
            except httpx.RemoteProtocolError:  # a kept-alive connection the server closed: once more
                if attempt:
                    raise
    return out


def server_once(client: Any, body: dict[str, Any]) -> tuple[str, float]:
    """One streamed chat completion: (answer, generation tok/s)."""
    usage: list[int] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        events = (
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        )

        def piece(event: Any, usage: list[int] = usage) -> str:
            if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens"):
                usage.append(int(event["usage"]["completion_tokens"]))
            choices = event.get("choices") or [{}]
            return str((choices[0].get("delta") or {}).get("content") or "")

        answer, pieces, seconds = timed_stream(events, piece)
    tokens = usage[-1] if usage else pieces
    return answer, (tokens - 1) / seconds if seconds > 0 and tokens > 1 else 0.0


def run_llama_cpp_server(
    path: Path, texts: list[str], threads: int, max_tokens: int
) -> list[tuple[str, float]]:
    from engine_bench import llama_cpp_server

    with llama_cpp_server(path, threads, 1, 2048) as server, server.make() as client:
        return server_stream(client, texts, max_tokens, {"type": "json_object", "schema": SCHEMA})


def run_llama_server(
    binary: Path, path: Path, texts: list[str], threads: int, max_tokens: int
) -> list[tuple[str, float]]:
    """llama.cpp's C++ ``llama-server`` (one slot of 2,048 tokens), the same ``json_schema`` as (a)."""
    from engine_bench import llama_server

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    with llama_server(binary, path, threads, 1, 2048) as server, server.make() as client:
        return server_stream(client, texts, max_tokens, fmt)


PEERS = ("agent", "free", "llama_cpp", "llama_cpp_server", "llama_server")
LABELS = {
    "agent": "(a) edge-agent, `json_schema` (grammar)",
    "free": "(b) edge-agent, unconstrained",
    "llama_cpp": "(c) llama-cpp-python `create_chat_completion`, `json_object` + schema",
    "llama_cpp_server": "(d) `python -m llama_cpp.server` (TCP), `json_object` + schema",
    "llama_server": "(e) llama.cpp's C++ `llama-server` (TCP), the same `json_schema` as (a)",
}


def main() -> None:
    parser = bench_parser(__doc__, SECTION)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a) and (e), alternating order")
    parser.add_argument(
        "--skip",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=[],
        help="leave out peers: llama_cpp (c), llama_cpp_server (d), llama_server (e)",
    )
    args = parser.parse_args()
    bad = [p for p in args.skip if p not in ("llama_cpp", "llama_cpp_server", "llama_server")]
    if bad:
        parser.error(f"--skip: unknown peer(s) {', '.join(bad)}")

    from engine_bench import cpu_name

    from agent.demo import CHAT_MODEL_ID, chat_model_file
    from tests.conftest import MODEL_CACHE
    from tests.daemon import running_daemon

    binary = None
    if "llama_server" not in args.skip:
        import llama_server as builder

        binary, _ = builder.ensure()
    model_path = chat_model_file(MODEL_CACHE)
    texts = prompts(args.prompts)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    env = {"EDGE_AGENT_ENGINE__N_THREADS": str(args.threads), "EDGE_AGENT_MODEL__ID": CHAT_MODEL_ID}
    runs: dict[str, list[list[tuple[str, float]]]] = {p: [] for p in PEERS}

    def agent(constrained_too: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp, running_daemon(Path(tmp), model_path, env=env) as daemon:
            runs["agent"].append(run_agent(daemon.socket, texts, CHAT_MODEL_ID, True, args.max_tokens))
            if constrained_too:
                runs["free"].append(run_agent(daemon.socket, texts, CHAT_MODEL_ID, False, args.max_tokens))
        print(f"(a) done: {sum(valid(t) for t, _ in runs['agent'][-1])} valid", file=sys.stderr, flush=True)

    def server() -> None:
        assert binary is not None
        runs["llama_server"].append(
            run_llama_server(binary, model_path, texts, args.threads, args.max_tokens)
        )
        print(
            f"(e) done: {sum(valid(t) for t, _ in runs['llama_server'][-1])} valid",
            file=sys.stderr,
            flush=True,
        )

    for rnd in range(args.rounds):
        order = [functools.partial(agent, rnd == 0)] + ([server] if binary is not None else [])
        for step in order if rnd % 2 == 0 else order[::-1]:
            step()
    if "llama_cpp" not in args.skip:
        runs["llama_cpp"].append(run_llama_cpp(model_path, texts, args.threads, args.max_tokens))
        print(
            f"(c) done: {sum(valid(t) for t, _ in runs['llama_cpp'][0])} valid", file=sys.stderr, flush=True
        )
    import importlib.util

    extras = ("uvicorn", "fastapi", "sse_starlette", "starlette_context")
    if "llama_cpp_server" not in args.skip and all(importlib.util.find_spec(m) for m in extras):
        runs["llama_cpp_server"].append(
            run_llama_cpp_server(model_path, texts, args.threads, args.max_tokens)
        )
        print(f"(d) done: {sum(valid(t) for t, _ in runs['llama_cpp_server'][0])} valid", file=sys.stderr)

    speed: dict[str, float] = {}
    share: dict[str, str] = {}
    per_round: dict[str, list[float]] = {}
    for peer, results in runs.items():
        if not results:
            continue
        per_round[peer] = [statistics.median(s for _, s in r if s > 0) for r in results]
        speed[peer] = statistics.median(per_round[peer])
        share[peer] = "n/a" if peer == "free" else f"{sum(valid(t) for t, _ in results[0])}/{len(results[0])}"

    def goal(name: str, peer: str, target: str) -> list[str]:
        return [f"| {name} | {speed['agent'] / speed[peer]:.2f}x | {target} |"] if peer in speed else []

    lines = [
        SECTION,
        "",
        f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.prompts} extraction prompts (a person "
        "described in prose; schema: name, age 0-120, city, born as a date, 1-3 skills from an enum), "
        f"greedy, max {args.max_tokens} tokens, one request at a time; {cpu_name()}, "
        f"{os.cpu_count()} cores (shared), load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end, {(time.monotonic() - t0) / 60:.1f} minutes. (a) and (e) "
        f"ran {args.rounds} alternating round(s) (figure: the median of the per-round medians; "
        "validity: the first round), (b), (c) and (d) once. (e) is llama.cpp's own server built like "
        "our llama-cpp-python (`bench/llama_server.py`; one slot of 2,048 tokens, defaults otherwise). "
        "Reproduce with `pip install -e '.[bench]'` (for (d)) then:",
        "",
        "```",
        "    " + " ".join(["python bench/structured_bench.py", *sys.argv[1:]]).strip(),
        "```",
        "",
        "| | generation tok/s (median) | per round | answers that parse and validate |",
        "|---|---|---|---|",
        *[
            f"| {LABELS[p]} | {speed[p]:.1f} | {', '.join(f'{v:.1f}' for v in per_round[p])} | {share[p]} |"
            for p in PEERS
            if p in speed
        ],
        "",
        "Goals (ratios from this run):",
        "",
        "| goal | measured | target |",
        "|---|---|---|",
        *goal("constrained / unconstrained (a)/(b)", "free", ">= 0.8x"),
        *goal(
            "constrained / llama.cpp's `llama-server`, same `json_schema` (a)/(e)", "llama_server", ">= 1x"
        ),
        *goal("constrained / llama-cpp-python's schema path (a)/(c)", "llama_cpp", ">= 1x"),
        *goal("constrained / `llama_cpp.server` (a)/(d)", "llama_cpp_server", ">= 1x"),
        f"| valid answers (a) | {share['agent']} | 100 % |",
        *(
            [f"| valid answers `llama-server` (e) | {share['llama_server']} | (peer) |"]
            if "llama_server" in share
            else []
        ),
        "",
        "Tokens/s count generated tokens after the first (the usage's `completion_tokens` where the "
        "server streams it, else one streamed piece per token). (c) and (d) run llama-cpp-python's own "
        "JSON Schema converter and grammar, (e) llama.cpp's C++ converter (`json_schema_to_grammar`); "
        "llama-cpp-python's converter lets raw control characters into strings and ignores numeric "
        "bounds (docs/api.md, Structured output), which the validity column shows when a model strays.",
    ]
    report(SECTION, "\n".join(lines), write=args.write)


if __name__ == "__main__":
    main()
