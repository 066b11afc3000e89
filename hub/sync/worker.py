"""``python -m hub.sync.worker``: one hub worker process (what ``edge-hub serve`` spawns for blob
workers, and what runs the whole hub with ``--role all``).

Invariant: a worker spawned with ``--parent-pid`` does not outlive that parent: the kernel sends it
SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), and it exits at once if the parent is already
gone. Otherwise a blob worker orphaned by a killed ``edge-hub serve`` and the one its restarted
parent spawns would share a client id and take the broker session from each other forever.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from pathlib import Path

from hub.sync.commands import add_broker_options, add_worker_options, serve_config
from hub.sync.serve import HubServer

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when ``parent_pid`` (its parent) dies; exit now if it is gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    """Run one worker until SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hub.sync.worker")
    add_broker_options(parser)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--db", default=None, help="SQLite path or postgresql:// URL ($EDGE_HUB_DB)")
    add_worker_options(parser, role="blobs")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="json")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    from fleet import log as fleet_log
    from hub.sync.db import db_target

    args.db = db_target(args.db)
    fleet_log.configure("info", args.log_format, service="edge-hub")
    return asyncio.run(HubServer(serve_config(args)).run())


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
