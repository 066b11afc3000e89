"""Structured-output benchmark: schema-constrained generation against unconstrained, and against
llama-cpp-python's own JSON Schema path, same model, threads and prompts, one run.

Runs, over the same ``--prompts`` varied extraction prompts (people described in prose: name, age,
city, birth date, skills), greedy, one request at a time:

  (a) edge-agent over its Unix socket, ``response_format: json_schema`` (our grammar);
  (b) edge-agent, the same prompts without ``response_format`` (unconstrained);
  (c) in-process ``llama_cpp.Llama.create_chat_completion(response_format={"type": "json_object",
      "schema": ...})``: llama-cpp-python's converter and grammar;
  (d) ``python -m llama_cpp.server`` over TCP on 127.0.0.1, the same ``response_format`` (needs the
      ``bench`` extras, ``pip install -e '.[bench]'``; left out when they are missing).

Reported: generation tokens/s after the first token (median over the prompts), and the share of
answers that parse as JSON and validate against the schema (``jsonschema_rs``, formats checked).

    .venv/bin/python bench/structured_bench.py --write
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def run_llama_server(path: Path, texts: list[str], threads: int, max_tokens: int) -> list[tuple[str, float]]:
    from engine_bench import llama_cpp_server

    out = []
    with llama_cpp_server(path, threads, 2048) as make:
        client = make()
        for text in texts:
            body = {
                "messages": [{"role": "user", "content": text}],
                "response_format": {"type": "json_object", "schema": SCHEMA},
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                events = (
                    json.loads(line[6:])
                    for line in response.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"
                )

                def piece(event: Any) -> str:
                    choices = event.get("choices") or [{}]
                    return str((choices[0].get("delta") or {}).get("content") or "")

                answer, pieces, seconds = timed_stream(events, piece)
            out.append((answer, (pieces - 1) / seconds if seconds > 0 and pieces > 1 else 0.0))
        client.close()
    return out


def main() -> None:
    parser = bench_parser(__doc__, SECTION)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()

    from agent.demo import CHAT_MODEL_ID, chat_model_file
    from tests.conftest import MODEL_CACHE
    from tests.daemon import running_daemon

    model_path = chat_model_file(MODEL_CACHE)
    texts = prompts(args.prompts)
    load = os.getloadavg()[0]
    env = {"EDGE_AGENT_ENGINE__N_THREADS": str(args.threads), "EDGE_AGENT_MODEL__ID": CHAT_MODEL_ID}
    with tempfile.TemporaryDirectory() as tmp, running_daemon(Path(tmp), model_path, env=env) as daemon:
        constrained = run_agent(daemon.socket, texts, CHAT_MODEL_ID, True, args.max_tokens)
        print(f"(a) done: {sum(valid(t) for t, _ in constrained)} valid", file=sys.stderr, flush=True)
        free = run_agent(daemon.socket, texts, CHAT_MODEL_ID, False, args.max_tokens)
        print("(b) done", file=sys.stderr, flush=True)
    peer = run_llama_cpp(model_path, texts, args.threads, args.max_tokens)
    print(f"(c) done: {sum(valid(t) for t, _ in peer)} valid", file=sys.stderr, flush=True)
    import importlib.util

    server = None
    if all(importlib.util.find_spec(m) for m in ("uvicorn", "fastapi", "sse_starlette", "starlette_context")):
        server = run_llama_server(model_path, texts, args.threads, args.max_tokens)
        print(f"(d) done: {sum(valid(t) for t, _ in server)} valid", file=sys.stderr, flush=True)

    def row(name: str, results: list[tuple[str, float]], check: bool) -> tuple[str, float, str]:
        speed = statistics.median(s for _, s in results if s > 0)
        share = f"{sum(valid(t) for t, _ in results)}/{len(results)}" if check else "n/a"
        return name, speed, share

    rows = [
        row("(a) edge-agent, `json_schema` (grammar)", constrained, True),
        row("(b) edge-agent, unconstrained", free, False),
        row("(c) llama-cpp-python `create_chat_completion`, `json_object` + schema", peer, True),
    ]
    if server is not None:
        rows.append(row("(d) `python -m llama_cpp.server` (TCP), the same `response_format`", server, True))
    lines = [
        SECTION,
        "",
        f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.prompts} extraction prompts (a person "
        "described in prose; schema: name, age 0-120, city, born as a date, 1-3 skills from an enum), "
        "greedy, "
        f"max {args.max_tokens} tokens, one request at a time; one run on 2 cores, load average at start "
        f"{load:.2f}. Reproduce with `pip install -e '.[bench]'` (for (d)) then:",
        "",
        "```",
        "    python bench/structured_bench.py --write",
        "```",
        "",
        "| | generation tok/s (median) | answers that parse and validate |",
        "|---|---|---|",
        *[f"| {name} | {speed:.1f} | {share} |" for name, speed, share in rows],
        "",
        "Goals (ratios from this run):",
        "",
        "| goal | measured | target |",
        "|---|---|---|",
        f"| constrained / unconstrained (a)/(b) | {rows[0][1] / rows[1][1]:.2f}x | >= 0.8x |",
        f"| constrained / llama-cpp-python's schema path (a)/(c) | {rows[0][1] / rows[2][1]:.2f}x | >= 1x |",
        *(
            [f"| constrained / `llama_cpp.server` (a)/(d) | {rows[0][1] / rows[3][1]:.2f}x | >= 1x |"]
            if server is not None
            else []
        ),
        f"| valid answers (a) | {rows[0][2]} | 100 % |",
        "",
        "(c) and (d) run llama-cpp-python's own JSON Schema converter and grammar ((d) counts streamed "
        "pieces, one per token); its converter lets raw control "
        "characters into strings and ignores numeric bounds (docs/api.md, Structured output), which the "
        "validity column shows when a model strays.",
    ]
    report(SECTION, "\n".join(lines), write=args.write)


if __name__ == "__main__":
    main()
