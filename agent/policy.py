"""The access policy document: its format, the local policy from config, and hub policies.

A policy document is JSON (the hub publishes it as the registry target ``policies/<name>.json``)
or the same structure inline in the config's ``[access]`` section::

    {"version": 3,
     "roles": {"admin": {"permissions": [{"actions": ["admin"]}]},
               "app":   {"permissions": [{"actions": ["infer", "embed"], "models": ["gemma-*"]},
                                         {"actions": ["models.list", "status"]}],
                         "limits": {"max_tokens": 512, "requests_per_minute": 60}}},
     "bindings": [{"role": "admin", "users": ["root"], "uids": [0]},
                  {"role": "app", "groups": ["edge-agent"]}]}

Invariants:

- Parsing is pure and strict: unknown keys, unknown actions, a binding to a role that does not
  exist, or a non-positive limit raise :class:`PolicyError` naming the key.
- The effective policy is the newest accepted hub policy if there is one, else the local policy
  (config file or the built-in default). Hub versions only grow: :func:`accept_policy` refuses a
  document that is invalid or not newer than the current one, and the current one stays.
  Re-delivering the current version with the same bytes is a no-op.
- The accepted hub policy is written atomically (temp file, fsync, rename) with its sha256, so a
  crash leaves either the old or the new policy, never a mix.

Signature checking is the registry's job (TUF): :func:`accept_policy` receives verified bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import os
import pwd
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.access import Binding, Limits, Permission, Policy, Role
from agent.errors import AgentError
from fleet.log import get_logger
from registry.exceptions import ManifestError
from registry.policy import MAX_POLICY_BYTES, PolicyDoc, validate_policy, validate_policy_bytes

if TYPE_CHECKING:
    from agent.config import Settings

log = get_logger(__name__)

HUB_POLICY_FILE = "hub.json"


class PolicyError(AgentError):
    """A policy document is invalid, or a hub policy is older than the current one."""


def to_policy(doc: PolicyDoc, source: str) -> Policy:
    """The access rules of a validated document."""
    roles = {
        name: Role(
            name=name,
            permissions=tuple(
                Permission(actions=frozenset(p.actions), models=tuple(p.models)) for p in r.permissions
            ),
            limits=Limits(r.limits.max_tokens, r.limits.requests_per_minute),
        )
        for name, r in doc.roles.items()
    }
    bindings = tuple(
        Binding(
            role=b.role,
            users=frozenset(b.users),
            groups=frozenset(b.groups),
            uids=frozenset(b.uids),
            key_ids=frozenset(b.key_ids),
        )
        for b in doc.bindings
    )
    return Policy(roles=roles, bindings=bindings, version=doc.version, source=source)


def parse_policy(data: Mapping[str, Any], source: str = "document") -> Policy:
    """Validate a policy document (already decoded); raise :class:`PolicyError` naming the key."""
    try:
        return to_policy(validate_policy(data, source), source)
    except ManifestError as exc:
        raise PolicyError(exc.detail) from None


def parse_policy_bytes(raw: bytes, source: str = "document") -> Policy:
    try:
        return to_policy(validate_policy_bytes(raw, source), source)
    except ManifestError as exc:
        raise PolicyError(exc.detail) from None


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The document form of ``policy`` (round-trips through :func:`parse_policy`)."""
    roles: dict[str, Any] = {}
    for name, role in policy.roles.items():
        entry: dict[str, Any] = {
            "permissions": [
                {"actions": sorted(a.value for a in p.actions), "models": list(p.models)}
                for p in role.permissions
            ]
        }
        limits = {
            k: v
            for k, v in (
                ("max_tokens", role.limits.max_tokens),
                ("requests_per_minute", role.limits.requests_per_minute),
            )
            if v
        }
        if limits:
            entry["limits"] = limits
        roles[name] = entry
    bindings = []
    for b in policy.bindings:
        item: dict[str, Any] = {"role": b.role}
        for key, values in (
            ("users", b.users),
            ("groups", b.groups),
            ("uids", b.uids),
            ("key_ids", b.key_ids),
        ):
            if values:
                item[key] = sorted(values)
        bindings.append(item)
    return {"version": policy.version, "roles": roles, "bindings": bindings}


def default_policy(daemon_uid: int, daemon_user: str, socket_group: str) -> Policy:
    """Root and the daemon's own user are admins; the socket's group may infer, embed, list
    models and read the status."""
    return parse_policy(
        {
            "version": 0,
            "roles": {
                "admin": {"permissions": [{"actions": ["admin"]}]},
                "user": {"permissions": [{"actions": ["infer", "embed", "models.list", "status"]}]},
            },
            "bindings": [
                {"role": "admin", "users": sorted({"root", daemon_user}), "uids": sorted({0, daemon_uid})},
                {"role": "user", "groups": [socket_group]},
            ],
        },
        source="built-in default",
    )


def _name_of_uid(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _name_of_gid(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def local_policy(settings: Settings) -> Policy:
    """The policy from config: ``[access] policy_file``, else inline roles/bindings, else the default."""
    access = settings.access
    if access.policy_file is not None:
        try:
            with access.policy_file.open("rb") as fh:
                raw = fh.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyError(f"policy {access.policy_file}: cannot read: {exc.strerror or exc}") from None
        return parse_policy_bytes(raw, str(access.policy_file))
    if access.roles:
        return parse_policy(
            {"version": 0, "roles": access.roles, "bindings": access.bindings}, "config [access]"
        )
    uid = os.geteuid()
    group = settings.server.socket_group or _name_of_gid(os.getegid())
    return default_policy(uid, _name_of_uid(uid), group)


def policy_dir(state_dir: Path) -> Path:
    return state_dir / "policy"


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    policy: Policy
    sha256: str


def load_hub_policy(state_dir: Path) -> StoredPolicy | None:
    """The accepted hub policy, or ``None``. A damaged file raises :class:`PolicyError`."""
    path = policy_dir(state_dir) / HUB_POLICY_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES * 2)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(f"policy {path}: cannot read: {exc.strerror or exc}") from None
    try:
        envelope = json.loads(raw)
        document = envelope["document"].encode("utf-8")
        digest = envelope["sha256"]
        version = envelope["version"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PolicyError(f"policy {path}: damaged envelope") from None
    if hashlib.sha256(document).hexdigest() != digest:
        raise PolicyError(f"policy {path}: content does not match its sha256")
    policy = parse_policy_bytes(document, f"hub v{version}")
    return StoredPolicy(_with_version(policy, version, f"hub v{version}"), digest)


def _with_version(policy: Policy, version: int, source: str) -> Policy:
    return Policy(roles=policy.roles, bindings=policy.bindings, version=version, source=source)


def effective_policy(settings: Settings) -> Policy:
    stored = load_hub_policy(settings.state_dir)
    return stored.policy if stored is not None else local_policy(settings)


class AuditSink(Protocol):
    """What :func:`accept_policy` needs from the audit log (``agent.audit.AuditLog.record``)."""

    def record(
        self,
        action: str,
        resource: str | None,
        outcome: str,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> int: ...


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    directory = policy_dir(state_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def accept_policy(
    state_dir: Path, document: bytes, version: int, *, audit: AuditSink | None = None, source: str = "hub"
) -> Policy:
    """Make ``document`` (verified bytes of a signed registry target) the current policy.

    Refuses, with :class:`PolicyError`, a document that does not parse, whose own ``version``
    disagrees with ``version``, or whose version is not newer than the accepted one; the current
    policy then stays. Each outcome is recorded in ``audit`` when given.
    """

    def refuse(reason: str) -> PolicyError:
        if audit is not None:
            audit.record("policy.change", f"{source} v{version}", "refused", reason)
        log.warning("policy_refused", version=version, reason=reason)
        return PolicyError(reason)

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise refuse(f"policy version must be a positive integer, got {version!r}")
    try:
        policy = parse_policy_bytes(document, f"{source} v{version}")
    except PolicyError as exc:
        raise refuse(str(exc)) from None
    if policy.version not in (0, version):
        raise refuse(f"policy document says version {policy.version}, the registry target says {version}")
    digest = hashlib.sha256(document).hexdigest()
    with _locked(state_dir):  # compare-and-write: two importers cannot race a version backwards
        current = load_hub_policy(state_dir)
        if current is not None:
            if version == current.policy.version and digest == current.sha256:
                return current.policy
            if version <= current.policy.version:
                raise refuse(
                    f"policy version {version} is not newer than the current version {current.policy.version}"
                )
        envelope = {
            "version": version,
            "source": source,
            "accepted_at": time.time(),
            "sha256": digest,
            "document": document.decode("utf-8"),
        }
        _write_atomic(policy_dir(state_dir) / HUB_POLICY_FILE, json.dumps(envelope).encode())
    if audit is not None:
        before = current.policy.version if current is not None else None
        audit.record(
            "policy.change",
            f"{source} v{version}",
            "ok",
            "accepted",
            {"previous_version": before, "sha256": digest},
        )
    log.info("policy_accepted", version=version, sha256=digest)
    return _with_version(policy, version, f"{source} v{version}")


class PolicyHolder:
    """The daemon's current policy; picks up a newly accepted hub policy without a restart.

    ``current()`` looks at the hub policy file at most once per ``recheck_s`` (by its stat
    signature); a damaged, invalid or unreadable file is logged and the policy in force stays.
    """

    def __init__(
        self,
        local: Policy,
        state_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = 1.0,
    ) -> None:
        self._local = local
        self._state_dir = state_dir
        self._clock = clock
        self._recheck_s = recheck_s
        self._next_check = float("-inf")
        self._stat: tuple[int, int, int] | None = None
        self._policy = local
        self.on_change: Callable[[Policy, Policy], None] | None = None

    @property
    def local(self) -> Policy:
        """The local policy (config file or built-in default), whether or not it is in force."""
        return self._local

    def replace_local(self, local: Policy) -> bool:
        """Make ``local`` the local policy (a config reload); returns whether it is now in force.

        It takes over at once when the local policy was in force; a hub policy in force stays
        (a newer hub policy still wins, and the local one applies if the hub file goes away).
        """
        self._next_check = float("-inf")
        self.current()  # pick up a hub policy accepted meanwhile first
        previous, self._local = self._local, local
        if self._policy is not previous:
            return False
        old, self._policy = self._policy, local
        if self.on_change is not None:
            self.on_change(old, local)
        return True

    def current(self) -> Policy:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._recheck_s
            self._refresh()
        return self._policy

    def _refresh(self) -> None:
        path = policy_dir(self._state_dir) / HUB_POLICY_FILE
        try:
            st = path.stat()
            sig: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        except OSError as exc:  # e.g. an unreadable policy directory: requests still get an answer
            error = f"{path}: {exc.strerror or exc}"
            log.error("policy_load_failed", error=error, keeping=self._policy.source)
            return
        if sig == self._stat:
            return
        self._stat = sig
        try:
            stored = load_hub_policy(self._state_dir)
        except PolicyError as exc:
            log.error("policy_load_failed", error=str(exc), keeping=self._policy.source)
            return
        new = stored.policy if stored is not None else self._local
        if stored is not None and new.version < self._policy.version:
            log.error("policy_rollback_ignored", found=new.version, current=self._policy.version)
            return
        old, self._policy = self._policy, new
        if old is not new and self.on_change is not None:
            self.on_change(old, new)


__all__ = [
    "AuditSink",
    "to_policy",
    "PolicyError",
    "PolicyHolder",
    "StoredPolicy",
    "accept_policy",
    "default_policy",
    "effective_policy",
    "load_hub_policy",
    "local_policy",
    "parse_policy",
    "parse_policy_bytes",
    "policy_dir",
    "policy_to_dict",
]
