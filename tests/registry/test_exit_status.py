"""fleet.exit_status: the exit status and the one stderr line each outcome gives."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from fleet.exit_status import INTERRUPTED, ExitRule, run_command
from registry.exceptions import ManifestError, RegistryError

RULES = (ExitRule(ManifestError, 2, "tool: "), ExitRule(RegistryError, 1, "tool: "))


def _raising(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        raise exc

    return func


@pytest.mark.parametrize(
    ("raised", "status", "line"),
    [
        (ManifestError("no name"), 2, "tool: malformed: no name"),
        (RegistryError("disk gone"), 1, "tool: io_error: disk gone"),
        (KeyboardInterrupt(), INTERRUPTED, None),
    ],
    ids=["subclass-rule-first", "base-rule", "interrupt-silent"],
)
def test_translated(
    raised: BaseException, status: int, line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    func = _raising(raised)
    assert run_command(func, argparse.Namespace(), RULES) == status
    err = capsys.readouterr().err
    assert err.splitlines() == ([line] if line else [])


def test_status_of_the_command_is_returned(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(lambda args: 3, argparse.Namespace(), RULES) == 3
    assert capsys.readouterr().err == ""


def test_unmatched_exception_propagates() -> None:
    with pytest.raises(ValueError, match="bug"):
        run_command(_raising(ValueError("bug")), argparse.Namespace(), RULES)
