"""``edge-agent doctor [--json] [--types T,...]``: check every tensor type on this CPU and build.

Runs :mod:`agent.engine.doctor` (each type in its own child process) and prints a table: per type
``ok``, or the signal (``SIGILL`` ...), ``error`` or ``timeout``, with the stage it died in and the
weight buffers llama.cpp chose (the CPU features in play), then the build and llama.cpp's CPU
features. ``--json`` prints the same as a JSON object (what ``<state_dir>/doctor.json`` holds for
the types of this run).

Exit statuses: 0 every type ran; 1 a type failed (the message names the failing types and says to
rebuild with ``EDGE_AGENT_LLAMA_PROFILE=safe`` or ``portable``, docs/operations.md), or the doctor
could not run (llama-cpp-python missing); 2 an unknown ``--types`` value (named).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.engine.doctor import DEFAULT_TIMEOUT_S, DoctorReport, TypeResult

_PLAIN_BUFFERS = frozenset({"CPU", "CPU_Mapped"})


def _extra_buffers(r: TypeResult) -> str:
    """The buffer types beyond plain CPU memory that held weights (``CPU_REPACK``, ``AMX``)."""
    extra = sorted({b for bufs in r.buffers.values() for b in bufs} - _PLAIN_BUFFERS)
    return " ".join(extra) or "-"


def _outcome(r: TypeResult) -> str:
    if r.ok:
        return "[green]ok[/green]"
    return f"[bold red]{r.summary}[/bold red]"


def render(report: DoctorReport) -> Any:
    """The table a human reads (a rich renderable)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table("type", "result", "seconds", "extra buffers", "where / why", title="edge-agent doctor")
    for r in report.results:
        why = "" if r.ok else escape(" - ".join(x for x in (r.stage or "", r.detail) if x))
        table.add_row(r.type, _outcome(r), f"{r.seconds:.1f}", escape(_extra_buffers(r)), why)
    build = report.build or {}
    lines = [
        f"build {report.build_id}"
        + (f" (profile {build.get('profile')}, {build.get('machine')})" if build else " (no build record)"),
        f"llama-cpp-python {report.llama_cpp_version}; llama.cpp CPU features: "
        + (" ".join(report.cpu_features) or "unknown"),
    ]
    disabled = build.get("disabled")
    if isinstance(disabled, list) and disabled:
        lines.append(f"present on this CPU but kept out of the build: {' '.join(map(str, disabled))}")
    ok = sum(1 for r in report.results if r.ok)
    lines.append(
        f"{ok} of {len(report.results)} types ok in {report.seconds:.1f} s "
        f"(batches {', '.join(map(str, report.batch_sizes))})"
    )
    if report.test_hook:
        lines.append(f"TEST HOOK SET: {report.test_hook}")
    return Group(table, *(Text(line) for line in lines))


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.cli.main import settings_from_args
    from agent.engine.doctor import failure_message, parse_types, run_doctor

    types = parse_types(args.types)
    settings = settings_from_args(args)
    threads = args.threads or 1
    report = run_doctor(settings.state_dir, types, threads=threads, jobs=args.jobs, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(render(report))
    if not report.ok:
        print(f"edge-agent doctor: {failure_message(report)}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor", help="run every tensor type through this llama.cpp build on this CPU (child processes)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--types",
        default=None,
        metavar="T,...",
        help="only these tensor types (default: all, e.g. Q4_0,Q8_0)",
    )
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads per child (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="children at a time (default: one per core)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds one type may take (default %(default)s)",
    )
    p.set_defaults(func=cmd_doctor)


__all__ = ["cmd_doctor", "register", "render"]
