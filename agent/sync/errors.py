"""Errors of fleet sync, rooted in :class:`agent.errors.AgentError`.

SyncError
├── MqttError            the broker connection or an MQTT operation failed
│   ├── NotConnected     no connection within the wait (the agent keeps serving locally)
│   ├── AckTimeout       PUBACK/SUBACK/UNSUBACK did not arrive in time
│   ├── PublishRefused   the broker answered a publish with a failure reason code (e.g. ACL)
│   └── SubscribeRefused the broker refused a subscription (reason code >= 0x80)
├── ProtocolError        a message does not have the shape docs/protocol.md defines
├── TransferError        a blob transfer failed; ``status`` is a :class:`~agent.sync.messages.Status`
└── LedgerError          the device's sync ledger (outbox, retries, removals) cannot be used
"""

from __future__ import annotations

from agent.errors import AgentError


class SyncError(AgentError):
    """Root of fleet-sync errors."""


class MqttError(SyncError):
    """An MQTT operation failed. ``reason_code`` is the MQTT 5 reason code when there is one."""

    def __init__(self, message: str, *, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class NotConnected(MqttError):
    """The client is not connected to the broker."""


class AckTimeout(MqttError):
    """An acknowledgement did not arrive within the timeout."""


class PublishRefused(MqttError):
    """The broker refused a publish (PUBACK reason code >= 0x80)."""


class SubscribeRefused(MqttError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""


class ProtocolError(SyncError):
    """A message payload is malformed."""


class TransferError(SyncError):
    """A transfer could not complete; ``status`` names why (a Status value string)."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class LedgerError(SyncError):
    """The sync ledger (``<state_dir>/sync/ledger.db``) cannot be opened, read or written."""


__all__ = [
    "AckTimeout",
    "LedgerError",
    "MqttError",
    "NotConnected",
    "ProtocolError",
    "PublishRefused",
    "SubscribeRefused",
    "SyncError",
    "TransferError",
]
