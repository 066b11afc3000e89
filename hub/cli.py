"""``edge-hub``: the fleet operator's tool."""

from __future__ import annotations

import argparse

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-hub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-hub {__version__}")
    parser.add_subparsers(dest="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
