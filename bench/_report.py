"""Writing a bench's section of docs/benchmarks.md, keeping every other section as it is.

A section starts at its ``## Title`` line and runs to the next ``## `` line (or the end of the file);
``write_section`` replaces it in place, or appends it when the file does not have it yet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(section: str, text: str, doc: Path = DOC) -> None:
    """Put ``text`` (which starts with the ``section`` heading) in place of that section of ``doc``."""
    existing = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = existing.find(f"\n{section}\n")
    if start == -1:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = existing.find("\n## ", start + 1)
        updated = existing[: start + 1] + text + (existing[end:] if end != -1 else "")
    doc.write_text(updated.rstrip("\n") + "\n")


def bench_parser(description: str | None, section: str) -> argparse.ArgumentParser:
    """The bench's argument parser, with the shared ``--write`` flag (replace ``section``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help=f"replace '{section}' in {DOC}")
    return parser


def report(section: str, text: str, *, write: bool) -> None:
    """Print the section; with ``write`` also put it into docs/benchmarks.md."""
    print(text)
    if write:
        write_section(section, text)


__all__ = ["DOC", "bench_parser", "report", "write_section"]
