"""The tamper-evident audit log: hash chain and checkpoints (pure), SQLite store, HTTP guard."""

from agent.audit.store import (
    AuditError,
    AuditFull,
    AuditLog,
    AuditUnavailable,
    Stats,
    agent_actor,
    audit_path,
    open_existing,
    open_log,
)
from fleet.chain import Checkpoint, Entry, Problem, Report, Sealed, verify

__all__ = [
    "AuditError",
    "AuditFull",
    "AuditLog",
    "AuditUnavailable",
    "Checkpoint",
    "Entry",
    "Problem",
    "Report",
    "Sealed",
    "Stats",
    "agent_actor",
    "audit_path",
    "open_existing",
    "open_log",
    "verify",
]
