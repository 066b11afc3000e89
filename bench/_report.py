"""Writing a bench's section of docs/benchmarks.md, keeping every other section as it is.

A section starts at its ``## Title`` line and runs to the next ``## `` line (or the end of the file);
``write_section`` replaces it in place, or, when the file does not have it yet, puts it right after
the section ``after`` (when given and present) or at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _end_of(existing: str, start: int) -> int:
    """Where the section starting at ``start`` (its leading newline) ends: the next heading or -1."""
    return existing.find("\n## ", start + 1)


def write_section(section: str, text: str, doc: Path = DOC, after: str | None = None) -> None:
    """Put ``text`` (which starts with the ``section`` heading) in place of that section of ``doc``;
    a new section goes right after the section ``after`` when that is present, else at the end."""
    existing = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = existing.find(f"\n{section}\n")
    anchor = existing.find(f"\n{after}\n") if after is not None else -1
    if start == -1 and anchor != -1 and (end := _end_of(existing, anchor)) != -1:
        updated = existing[: end + 1] + text.rstrip("\n") + "\n\n" + existing[end + 1 :]
    elif start == -1:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = _end_of(existing, start)
        updated = existing[: start + 1] + text + (existing[end:] if end != -1 else "")
    doc.write_text(updated.rstrip("\n") + "\n")


def bench_parser(description: str | None, section: str) -> argparse.ArgumentParser:
    """The bench's argument parser, with the shared ``--write`` flag (replace ``section``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help=f"replace '{section}' in {DOC}")
    return parser


def report(section: str, text: str, *, write: bool, after: str | None = None) -> None:
    """Print the section; with ``write`` also put it into docs/benchmarks.md (see ``write_section``)."""
    print(text)
    if write:
        write_section(section, text, after=after)


__all__ = ["DOC", "bench_parser", "report", "write_section"]
