"""structlog set-up: one processor chain, two renderers.

JSON lines when the output is not a terminal (journald keeps each field), a readable console
rendering when it is. Context variables (``request_id``, ``peer_uid`` ...) bound with
:func:`structlog.contextvars.bind_contextvars` appear on every line logged inside that request.
Processors are plain functions so tests can exercise them with ``structlog.testing``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def add_service(service: str) -> Processor:
    """A processor that tags every line with ``service`` (``edge-agent``, ``edge-hub``), so mixed
    journald streams can be filtered."""

    def tag(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return tag


def shared_processors(service: str = "edge-agent") -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service(service),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, service: str = "edge-agent"
) -> None:
    """Configure structlog globally for ``service``. ``fmt`` is ``auto``, ``json`` or ``console``."""
    out = stream if stream is not None else sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    renderer: Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared_processors(service), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream) if stream is not None else _current_stdout,
        cache_logger_on_first_use=False,
    )


def _current_stdout(*_: Any) -> structlog.PrintLogger:
    """A logger on whatever ``sys.stdout`` is *now* (it may be replaced after configuration)."""
    return structlog.PrintLogger(sys.stdout)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


__all__ = ["add_service", "configure", "get_logger", "shared_processors"]
