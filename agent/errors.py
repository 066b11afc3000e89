"""The agent's one error tree.

    AgentError
    ├── ConfigError            a setting is missing, malformed or out of range (exit status 2)
    ├── EngineError            an inference backend failed
    │   ├── ModelLoadError     the model file could not be loaded
    │   │   └── ModelRefused   its trial in a child process crashed or hung (crash isolation)
    │   ├── ModelNotReady      the model is still loading (HTTP 503 + Retry-After)
    │   └── ContextOverflow    prompt + max_tokens do not fit the context (HTTP 400)
    ├── RequestError           a client sent something we refuse (HTTP 4xx)
    │   ├── BadRequest         400
    │   ├── Forbidden          403
    │   ├── NotFound           404
    │   ├── PayloadTooLarge    413
    │   └── Overloaded         429/503 with Retry-After
    └── ClientError            the CLI could not talk to the daemon

Other libraries' exceptions are translated into these at the edge that calls them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is invalid. ``str(err)`` is one line naming key, value and expectation."""


class EngineError(AgentError):
    """An inference backend failed."""


class ModelLoadError(EngineError):
    """A model file could not be loaded."""


class ModelRefused(ModelLoadError):
    """Crash isolation refused a model: its trial in a child process died (``reason``: the signal,
    e.g. ``SIGILL``), hung (``timeout``), or the daemon died while activating it (``daemon_died``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelNotReady(EngineError):
    """The model is not loaded yet; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(AgentError):
    """A request the agent refuses. ``status`` is the HTTP status, ``code`` the OpenAI error code."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class BadRequest(RequestError):
    status = 400


class ContextOverflow(BadRequest, EngineError):
    """Prompt plus completion budget exceed the model's context window."""

    code = "context_length_exceeded"


class Forbidden(RequestError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class Overloaded(RequestError):
    """The queue is full or the model is not ready: 429 or 503 with ``Retry-After``."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, status: int = 503) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class ClientError(AgentError):
    """The command-line client could not reach or understand the daemon."""


__all__ = [
    "AgentError",
    "BadRequest",
    "ClientError",
    "ConfigError",
    "ContextOverflow",
    "EngineError",
    "Forbidden",
    "ModelLoadError",
    "ModelNotReady",
    "ModelRefused",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RequestError",
]
