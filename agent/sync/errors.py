"""Errors of fleet sync on the device, rooted in :class:`agent.errors.AgentError`.

    SyncError
    ├── TransferError        a blob transfer failed; ``status`` is a :class:`~fleet.messages.Status`
    └── LedgerError          the device's sync ledger (outbox, retries, removals) cannot be used

The wire and broker errors (``MqttError``, ``ProtocolError`` ...) are :mod:`fleet.errors`, shared
with the hub; sync code catches both trees (:data:`SYNC_FAILURES`).
"""

from __future__ import annotations

from agent.errors import AgentError
from fleet.errors import FleetError


class SyncError(AgentError):
    """Root of the device's fleet-sync errors."""


class TransferError(SyncError):
    """A transfer could not complete; ``status`` names why (a Status value string)."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class LedgerError(SyncError):
    """The sync ledger (``<state_dir>/sync/ledger.db``) cannot be opened, read or written."""


SYNC_FAILURES: tuple[type[Exception], ...] = (SyncError, FleetError)
"""What a sync round catches: its own failures and those of the wire (broker, malformed message)."""

__all__ = ["LedgerError", "SYNC_FAILURES", "SyncError", "TransferError"]
