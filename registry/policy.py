"""The access policy document: the schema the hub validates before it signs and the device before
it applies (``policies/<name>.json`` targets; ``[access]`` in the agent's config has the same shape).

Invariants: validation is pure and strict: unknown keys, unknown actions, a binding to a role that
does not exist, a bad name or a non-positive limit raise :class:`registry.exceptions.ManifestError`
naming the key; a document that validates here is accepted by every device of the same version.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.exceptions import ManifestError

MAX_POLICY_BYTES = 1 << 20
_NAME = r"^[A-Za-z0-9_.@-]{1,64}$"


class Action(enum.StrEnum):
    """What a caller may ask for."""

    INFER = "infer"
    EMBED = "embed"
    MODELS_LIST = "models.list"
    MODELS_ADMIN = "models.admin"
    AUDIT_READ = "audit.read"
    STATUS = "status"
    ADMIN = "admin"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PermissionDoc(_Doc):
    actions: list[Action] = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)

    @field_validator("actions", mode="before")
    @classmethod
    def _actions(cls, value: Any) -> Any:
        if isinstance(value, list):
            known = {a.value for a in Action}
            for item in value:
                if isinstance(item, str) and item not in known:
                    raise ValueError(f"unknown action {item!r} (known: {', '.join(sorted(known))})")
            return [Action(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("models")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or len(pattern) > 256:
                raise ValueError("model patterns are non-empty strings of at most 256 characters")
        return value


class LimitsDoc(_Doc):
    max_tokens: int | None = Field(default=None, ge=1)
    requests_per_minute: int | None = Field(default=None, ge=1)


class RoleDoc(_Doc):
    permissions: list[PermissionDoc] = Field(default_factory=list)
    limits: LimitsDoc = Field(default_factory=LimitsDoc)


class BindingDoc(_Doc):
    role: str = Field(pattern=_NAME)
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    uids: list[int] = Field(default_factory=list)
    key_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _someone(self) -> BindingDoc:
        if not (self.users or self.groups or self.uids or self.key_ids):
            raise ValueError("a binding names at least one of users, groups, uids, key_ids")
        return self


class PolicyDoc(_Doc):
    version: int = Field(default=0, ge=0)
    roles: dict[str, RoleDoc]
    bindings: list[BindingDoc] = Field(default_factory=list)

    @field_validator("roles")
    @classmethod
    def _role_names(cls, value: dict[str, RoleDoc]) -> dict[str, RoleDoc]:
        for name in value:
            if not re.match(_NAME, name):
                raise ValueError(f"role name {name!r} must match {_NAME}")
        return value

    @model_validator(mode="after")
    def _bound_roles_exist(self) -> PolicyDoc:
        for i, b in enumerate(self.bindings):
            if b.role not in self.roles:
                raise ValueError(f"bindings[{i}] names role {b.role!r}, which is not defined")
        return self


def _first_problem(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        what = "unknown key"
    elif first["type"] == "missing":
        what = "required key is missing"
    else:
        what = first["msg"].removeprefix("Value error, ")
    return f"{key}: {what}"


def validate_policy(data: Any, source: str = "document") -> PolicyDoc:
    """The validated document; :class:`ManifestError` (``policy <source>: <key>: <problem>``) if not."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"policy {source}: expected a JSON object")
    try:
        return PolicyDoc.model_validate(dict(data))
    except ValidationError as exc:
        raise ManifestError(f"policy {source}: {_first_problem(exc)}") from None


def validate_policy_bytes(raw: bytes, source: str = "document") -> PolicyDoc:
    """:func:`validate_policy` of UTF-8 JSON bytes (at most :data:`MAX_POLICY_BYTES`)."""
    if len(raw) > MAX_POLICY_BYTES:
        raise ManifestError(f"policy {source}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"policy {source}: not UTF-8 JSON ({exc})") from None
    return validate_policy(data, source)


__all__ = [
    "Action",
    "BindingDoc",
    "LimitsDoc",
    "MAX_POLICY_BYTES",
    "PermissionDoc",
    "PolicyDoc",
    "RoleDoc",
    "validate_policy",
    "validate_policy_bytes",
]
