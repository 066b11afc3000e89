"""The tamper-evident audit log: the SQLite store (the chain format is :mod:`fleet.chain`; the HTTP
guard and audit routes are in :mod:`agent.server`)."""

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
