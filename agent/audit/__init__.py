"""The tamper-evident audit log: hash chain and checkpoints (pure), SQLite store, HTTP guard."""

from agent.audit.chain import Checkpoint, Entry, Problem, Report, Sealed, verify
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
