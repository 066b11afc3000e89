"""``edge-hub``: the fleet operator's tool.

Exit statuses: 0 success, 1 runtime failure (including refusals), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agent import __version__
from registry.exceptions import ManifestError, RegistryError

# Each area of the hub registers its own subcommands: a module with ``register(sub)`` that adds
# parsers whose ``func`` takes the parsed arguments and returns the exit status.
COMMAND_MODULES: tuple[str, ...] = ("hub.repo_cmd", "hub.sync_cmd")


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
    try:
        code: int = func(args)
    except ManifestError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
