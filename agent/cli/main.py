"""``edge-agent``: the daemon and its local clients.

Exit statuses: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.config import Settings, load_settings
from agent.errors import AgentError, ConfigError
from fleet.errors import FleetError
from fleet.exit_status import ExitRule, run_command

EXIT_RULES = (
    ExitRule(ConfigError, 2, ""),
    ExitRule(AgentError, 1, "edge-agent: "),
    ExitRule(FleetError, 1, "edge-agent: "),
)
"""A configuration error prints as it is (it names the file); any other agent error is a runtime one."""


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "state_dir", None) is not None:
        settings = settings.model_copy(update={"state_dir": args.state_dir})
    return settings


def _socket(args: argparse.Namespace, settings: Settings) -> Path:
    return args.socket if getattr(args, "socket", None) else settings.socket_path


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import app
    from agent.daemon.reload import ConfigSource
    from fleet import log

    settings = settings_from_args(args)
    log.configure(settings.log.level, settings.log.format)
    return app.run(settings, ConfigSource(args.config, getattr(args, "state_dir", None)))


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import build_demo_store

    settings = settings_from_args(args)
    store = build_demo_store(settings.state_dir)
    print(f"demo store ready: {', '.join(store.models)} (signed by {store.repo}, bundle {store.bundle})")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from agent.cli.client import LocalClient

    settings = settings_from_args(args)
    body: dict[str, object] = {"prompt": args.prompt, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.seed is not None:
        body["seed"] = args.seed
    if args.model:
        body["model"] = args.model
    with LocalClient(_socket(args, settings)) as client:
        for chunk in client.stream_completion(body):
            for choice in chunk.get("choices", []):
                sys.stdout.write(choice.get("text", ""))
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from agent.cli.chat import ChatSession, reader
    from agent.cli.client import LocalClient

    settings = settings_from_args(args)
    options: dict[str, object] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    with LocalClient(_socket(args, settings)) as client:
        session = ChatSession(client, model=args.model, system=args.system, options=options)
        if sys.stdin.isatty():
            sys.stderr.write("edge-agent chat: /bye to leave, /help for more\n")
        return session.run(reader(sys.stdin))


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cli.client import LocalClient

    settings = settings_from_args(args)
    with LocalClient(_socket(args, settings), timeout=10.0) as client:
        health = client.get("/health")
        detail = client.get("/admin/status")
    if args.json:
        print(json.dumps({"health": health, "status": detail}, indent=2))
        return 0
    from rich.console import Console

    from agent.cli.status import render

    Console().print(render(health, detail))
    return 0


# Each area of the agent registers its own subcommands: a module with ``register(sub)`` that adds
# parsers whose ``func`` takes the parsed arguments and returns the exit status.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.cli.audit",
    "agent.cli.doctor",
    "agent.cli.registry",
    "agent.cli.select",
    "agent.cli.sync",
)


_BUILTIN = frozenset({"run", "demo", "complete", "chat", "status"})


def _builtin_command(argv: list[str]) -> bool:
    """Whether ``argv`` runs a command of this module: then the command modules (and their imports:
    tuf, gguf, numpy ...) are not loaded, which keeps the daemon's start-up and memory small."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--state-dir")
    _, rest = pre.parse_known_args(argv)
    return bool(rest) and rest[0] in _BUILTIN


def build_parser(load_modules: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument("--state-dir", type=Path, default=None, help="override state_dir")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "demo", help="build the signed demo store (Gemma 3 270M, SmolLM2-135M-Instruct, MiniLM)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("complete", help="stream a completion from the running daemon")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--socket", type=Path, default=None)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("chat", help="chat with a model of the running daemon (interactive, streaming)")
    p.add_argument("model", nargs="?", default=None, help="a served model id (default: the chat default)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--socket", type=Path, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("status", help="show the daemon's state")
    p.add_argument("--json", action="store_true")
    p.add_argument("--socket", type=Path, default=None)
    p.set_defaults(func=cmd_status)

    import importlib

    for name in COMMAND_MODULES if load_modules else ():
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(load_modules=not _builtin_command(argv)).parse_args(argv)
    return run_command(args.func, args, EXIT_RULES)


__all__ = ["COMMAND_MODULES", "EXIT_RULES", "build_parser", "main", "settings_from_args"]

if __name__ == "__main__":
    raise SystemExit(main())
