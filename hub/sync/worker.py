"""``python -m hub.sync.worker``: one hub worker process (what ``edge-hub serve`` spawns for blob
workers, and what runs the whole hub with ``--role all``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hub.sync.commands import add_broker_options, add_worker_options, serve_config
from hub.sync.serve import HubServer


def main(argv: list[str] | None = None) -> int:
    """Run one worker until SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hub.sync.worker")
    add_broker_options(parser)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--db", default=None, help="SQLite path or postgresql:// URL ($EDGE_HUB_DB)")
    add_worker_options(parser, role="blobs")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="json")
    args = parser.parse_args(argv)
    from fleet import log as fleet_log
    from hub.sync.db import db_target

    args.db = db_target(args.db)
    fleet_log.configure("info", args.log_format, service="edge-hub")
    return asyncio.run(HubServer(serve_config(args)).run())


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
