"""How a command-line tool turns a command's outcome into an exit status (``edge-agent``, ``edge-hub``).

It lives here because ``registry`` is the one package both tools already build on, and it imports
nothing but the standard library, so neither tool gains a dependency by using it.

Invariants: the command's own status is returned unchanged; an exception that matches a rule is
printed on stderr as one line (the rule's prefix, then ``str(exc)``) and gives the rule's status
(rules are tried in order, so a subclass's rule goes before its base's); ``KeyboardInterrupt``
gives 130 silently; any other exception propagates (a bug keeps its traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

INTERRUPTED = 130
"""The shell's status for a process stopped by SIGINT (128 + 2)."""


class ExitRule(NamedTuple):
    """Exceptions of ``kind`` end the command with ``status``; ``prefix`` starts the printed line."""

    kind: type[Exception]
    status: int
    prefix: str


def run_command(
    func: Callable[[argparse.Namespace], int], args: argparse.Namespace, rules: Sequence[ExitRule]
) -> int:
    """Run ``func(args)`` and return its exit status, translating the exceptions ``rules`` name."""
    try:
        return func(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        for rule in rules:
            if isinstance(exc, rule.kind):
                print(f"{rule.prefix}{exc}", file=sys.stderr)
                return rule.status
        raise


__all__ = ["INTERRUPTED", "ExitRule", "run_command"]
