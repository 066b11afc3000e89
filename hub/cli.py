"""``edge-hub``: the fleet operator's tool.

Exit statuses: 0 success, 1 runtime failure (including refusals), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib

from fleet import __version__
from fleet.exit_status import ExitRule, run_command
from registry.exceptions import ManifestError, RegistryError

# Each area of the hub registers its own subcommands: a module with ``register(sub)`` that adds
# parsers whose ``func`` takes the parsed arguments and returns the exit status.
COMMAND_MODULES: tuple[str, ...] = ("hub.repo.commands", "hub.sync.commands", "hub.sync.device_commands")
EXIT_RULES = (ExitRule(ManifestError, 2, "edge-hub: "), ExitRule(RegistryError, 1, "edge-hub: "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-hub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-hub {__version__}")
    sub = parser.add_subparsers(dest="command")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return run_command(func, args, EXIT_RULES)


if __name__ == "__main__":
    raise SystemExit(main())
