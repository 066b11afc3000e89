"""What the registry signs: TUF role settings, target paths and the documents carried as targets.

Everything the hub publishes is a TUF target (see ARCHITECTURE.md section 2):

    models/<id>/<version>/<file>   custom = {"kind": "model", "manifest": ModelManifest}
                                   or {"kind": "model_file", "file": CompanionFile} (tokenizer ...)
    policies/<name>.json           custom = {"kind": "policy"}
    deployments/<group>.json       custom = {"kind": "deployment"}; the file is a Deployment

Invariants:
- A :class:`ModelManifest` that exists is valid: ``__post_init__`` checks every field, so code that
  receives one never re-validates. ``from_custom(m.to_custom()) == m`` for every manifest.
- Target paths are plain relative POSIX paths of ASCII names (``[A-Za-z0-9._-]``, no leading dot,
  no ``..``, no absolute paths, no empty or odd segments); :func:`parse_target_path` refuses any
  other path with reason ``bad_path`` *before* anything is written to disk.
- Digests are lowercase hex sha256; ``chunk_sha256`` has exactly ``ceil(file_size / chunk_size)``
  entries (one for an empty file is never produced: empty files are refused).
- Nothing here does I/O except :func:`digest_file`, which reads one file in bounded blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from registry.exceptions import ManifestError, Reason, Refused

# --- TUF roles -------------------------------------------------------------------------------

TOP_LEVEL_ROLES: tuple[str, ...] = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY: Mapping[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
"""How long each role's metadata stays valid after signing; the timestamp is re-signed on a schedule
(``edge-hub timestamp refresh``)."""

METADATA_MAX_BYTES: Mapping[str, int] = {
    "root": 512 << 10,
    "timestamp": 16 << 10,
    "snapshot": 2 << 20,
    "targets": 8 << 20,
}
"""Upper bounds on metadata downloads (endless-data attack); passed to ngclient's ``UpdaterConfig``."""

DOCUMENT_MAX_BYTES = 1 << 20
"""Policies and deployments are small JSON documents; larger ones are refused."""

CUSTOM_MAX_BYTES = 4 << 20
"""A target's signed ``custom`` (the model manifest) as canonical JSON: refused above this at
publish and at import, since the device copies it into its index (``installed.json``, read with a
64 MiB cap). 4 MiB holds the chunk hashes of a 250 GiB model in 4 MiB chunks (or of a 160 MiB one
in 4 KiB chunks, as the tests use) and a long chat template."""


def check_custom_size(path: str, custom: Mapping[str, Any]) -> None:
    """:class:`ManifestError` when ``custom`` is larger than :data:`CUSTOM_MAX_BYTES`."""
    size = len(canonical_json(dict(custom)))
    if size > CUSTOM_MAX_BYTES:
        raise ManifestError(f"{path}: manifest of {size} bytes, above the cap of {CUSTOM_MAX_BYTES}")


DEFAULT_CHUNK_SIZE = 4 << 20
"""Per-chunk hashes let a transfer resume and verify each chunk as it arrives (MQTT sync)."""

# --- manifest --------------------------------------------------------------------------------

SizeClass = Literal["micro", "small", "medium"]
ModelFormat = Literal["gguf", "onnx"]
Task = Literal["completion", "chat", "embedding"]
TargetKind = Literal["model", "model_file", "policy", "deployment"]

SIZE_CLASS_BOUNDS: tuple[tuple[SizeClass, int], ...] = (
    ("micro", 1_500_000_000),
    ("small", 14_000_000_000),
    ("medium", 30_000_000_001),
)
"""Upper bounds (exclusive) in parameters: micro < 1.5B (100M-1.4B, and smaller encoders such as
MiniLM), small 1.5B-13.9B, medium 14B-30B. Larger models are not edge models and are refused."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CPU_FEATURE = re.compile(r"[a-z0-9_.]{1,32}")


def size_class(parameters: int) -> SizeClass:
    """Classify by parameter count; raise :class:`ManifestError` above 30B or for <= 0."""
    if parameters <= 0:
        raise ManifestError(f"parameter count must be positive, got {parameters}")
    for name, bound in SIZE_CLASS_BOUNDS:
        if parameters < bound:
            return name
    raise ManifestError(f"{parameters} parameters is larger than the medium class (30B)")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


def _check_digest(value: object, what: str) -> None:
    _check(isinstance(value, str) and bool(_HEX64.fullmatch(value)), f"{what} must be 64 lowercase hex")


def _check_chunks(file_size: int, chunk_size: int, chunks: tuple[str, ...], what: str) -> None:
    _check(isinstance(file_size, int) and file_size > 0, f"{what}: file_size must be a positive int")
    _check(
        isinstance(chunk_size, int) and 4096 <= chunk_size <= 1 << 30,
        f"{what}: chunk_size must be between 4 KiB and 1 GiB",
    )
    expected = math.ceil(file_size / chunk_size)
    _check(
        isinstance(chunks, tuple) and len(chunks) == expected,
        f"{what}: expected {expected} chunk hashes for {file_size} bytes in chunks of {chunk_size}",
    )
    for i, c in enumerate(chunks):
        _check_digest(c, f"{what}: chunk_sha256[{i}]")


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """The signed description of one model file (the primary file of a model version).

    ``file_name`` is the last segment of the target path ``models/<id>/<version>/<file_name>``.
    Architecture fields are ``None`` where the format does not have them (ONNX encoders have no
    chat template or sliding window; GGUF files have no opset). ``inputs``/``outputs``/``opset``
    describe ONNX graphs. ``companions`` names further target files of the same model version
    (e.g. ``tokenizer.json``), each published as a ``model_file`` target.
    """

    id: str
    version: str
    family: str
    parameters: int
    quantization: str
    format: ModelFormat
    task: Task
    file_name: str
    file_size: int
    sha256: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    context_length: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    embedding_length: int | None = None
    sliding_window: int | None = None
    vocab_size: int | None = None
    chat_template: str | None = None
    licence: str = "unknown"
    min_cpu_features: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    opset: int | None = None
    companions: tuple[str, ...] = ()
    size_class: SizeClass = field(init=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.id, str) and bool(_ID.fullmatch(self.id)), f"bad model id {self.id!r}")
        _check(
            isinstance(self.version, str) and bool(_VERSION.fullmatch(self.version)),
            f"bad version {self.version!r}",
        )
        _check(isinstance(self.family, str) and 0 < len(self.family) <= 64, "family must be 1-64 chars")
        _check(isinstance(self.parameters, int) and not isinstance(self.parameters, bool), "bad parameters")
        object.__setattr__(self, "size_class", size_class(self.parameters))
        _check(
            isinstance(self.quantization, str) and 0 < len(self.quantization) <= 32,
            "quantization must be 1-32 chars",
        )
        _check(self.format in get_args(ModelFormat), f"format must be gguf or onnx, got {self.format!r}")
        _check(self.task in get_args(Task), f"task must be completion, chat or embedding, got {self.task!r}")
        _check(
            isinstance(self.file_name, str) and bool(_NAME.fullmatch(self.file_name)),
            f"bad file name {self.file_name!r}",
        )
        _check_digest(self.sha256, "sha256")
        _check_chunks(self.file_size, self.chunk_size, self.chunk_sha256, "manifest")
        for name in (
            "context_length",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "embedding_length",
            "sliding_window",
            "vocab_size",
            "opset",
        ):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                f"{name} must be a positive int or null, got {value!r}",
            )
        _check(
            self.chat_template is None
            or (isinstance(self.chat_template, str) and len(self.chat_template) < 64_000),
            "chat_template must be a string under 64000 chars",
        )
        _check(isinstance(self.licence, str) and 0 < len(self.licence) <= 128, "licence must be 1-128 chars")
        _check(
            all(isinstance(f, str) and _CPU_FEATURE.fullmatch(f) for f in self.min_cpu_features),
            f"bad min_cpu_features {self.min_cpu_features!r}",
        )
        for what in ("inputs", "outputs"):
            names = getattr(self, what)
            _check(
                isinstance(names, tuple) and all(isinstance(n, str) and 0 < len(n) <= 256 for n in names),
                f"bad {what}",
            )
        _check(
            all(isinstance(c, str) and _NAME.fullmatch(c) and c != self.file_name for c in self.companions),
            f"bad companions {self.companions!r}",
        )

    @property
    def target_path(self) -> str:
        return model_target_path(self.id, self.version, self.file_name)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists); ``size_class`` is included for readers."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ModelManifest:
        """Parse and validate; unknown keys are refused, ``size_class`` is recomputed and must agree."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest must be a JSON object")
        kwargs = dict(data)
        claimed = kwargs.pop("size_class", None)
        known = {f for f in cls.__dataclass_fields__ if f != "size_class"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ManifestError(f"unknown manifest fields: {', '.join(unknown)}")
        for key in ("chunk_sha256", "min_cpu_features", "inputs", "outputs", "companions"):
            if key in kwargs:
                value = kwargs[key]
                if not isinstance(value, list | tuple):
                    raise ManifestError(f"{key} must be a list")
                kwargs[key] = tuple(value)
        try:
            manifest = cls(**kwargs)
        except TypeError as exc:
            raise ManifestError(f"manifest: {exc}") from None
        if claimed is not None and claimed != manifest.size_class:
            raise ManifestError(f"size_class {claimed!r} does not match {manifest.parameters} parameters")
        return manifest

    def to_custom(self) -> dict[str, Any]:
        """The TUF target's ``custom`` field."""
        return {"kind": "model", "manifest": self.to_json_dict()}

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any]) -> ModelManifest:
        if not isinstance(custom, Mapping) or custom.get("kind") != "model":
            raise ManifestError("target custom field is not a model manifest")
        return cls.from_json_dict(custom.get("manifest", {}))

    def to_json(self) -> bytes:
        return canonical_json(self.to_json_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelManifest:
        return cls.from_json_dict(load_json_object(raw, "manifest"))


@dataclass(frozen=True, slots=True)
class CompanionFile:
    """A further file of a model version (tokenizer, vocabulary ...), published as its own target."""

    model_id: str
    version: str
    name: str
    purpose: str
    file_size: int
    sha256: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(bool(_ID.fullmatch(self.model_id)), f"bad model id {self.model_id!r}")
        _check(bool(_VERSION.fullmatch(self.version)), f"bad version {self.version!r}")
        _check(bool(_NAME.fullmatch(self.name)), f"bad file name {self.name!r}")
        _check(bool(_NAME.fullmatch(self.purpose)), f"bad purpose {self.purpose!r}")
        _check_digest(self.sha256, "sha256")
        _check_chunks(self.file_size, self.chunk_size, self.chunk_sha256, "companion")

    @property
    def target_path(self) -> str:
        return model_target_path(self.model_id, self.version, self.name)

    def to_custom(self) -> dict[str, Any]:
        data = asdict(self)
        data["chunk_sha256"] = list(self.chunk_sha256)
        return {"kind": "model_file", "file": data}

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any]) -> CompanionFile:
        if not isinstance(custom, Mapping) or custom.get("kind") != "model_file":
            raise ManifestError("target custom field is not a model file")
        data = dict(custom.get("file") or {})
        if not isinstance(data.get("chunk_sha256"), list):
            raise ManifestError("chunk_sha256 must be a list")
        data["chunk_sha256"] = tuple(data["chunk_sha256"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ManifestError(f"model file: {exc}") from None


@dataclass(frozen=True, slots=True)
class DeploymentEntry:
    """One model a group must hold. ``version`` None means the newest published; ``pin`` makes the
    agent serve this model as the default instead of letting selection choose."""

    model: str
    version: str | None = None
    pin: bool = False

    def __post_init__(self) -> None:
        _check(bool(_ID.fullmatch(self.model)), f"bad model id {self.model!r}")
        _check(
            self.version is None or bool(_VERSION.fullmatch(self.version)), f"bad version {self.version!r}"
        )
        _check(isinstance(self.pin, bool), "pin must be true or false")


MAX_WAVE_DEVICES = 10_000
"""Device ids one deployment's waves may name in all (64 bytes each at most: well under
:data:`DOCUMENT_MAX_BYTES`)."""
_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class WaveEntry:
    """A staged rollout's signed selector: the devices named here hold ``model`` at ``version``
    instead of the group's entry for that model; every other device of the group keeps the group's
    entry. Signed with the deployment, so a device can take only what is signed for its own id."""

    model: str
    version: str
    devices: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(bool(_ID.fullmatch(self.model)), f"bad model id {self.model!r}")
        _check(bool(_VERSION.fullmatch(self.version)), f"bad version {self.version!r}")
        _check(
            isinstance(self.devices, tuple)
            and all(isinstance(d, str) and _DEVICE_ID.fullmatch(d) for d in self.devices),
            "wave devices must be device ids",
        )
        _check(len(set(self.devices)) == len(self.devices), "a device appears twice in a wave")


def check_mirror_url(url: str) -> str:
    """An ``http://`` or ``https://`` URL with a host and no credentials, query or fragment
    (the base of a copy of the repository's ``targets/``); ValueError naming it otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url)
    ):
        raise ValueError(
            f"bad mirror URL {url!r}: expected http(s)://host[:port]/path/ without credentials or query"
        )
    return url


@dataclass(frozen=True, slots=True)
class Deployment:
    """Desired state of a device group (``deployments/<group>.json``).

    ``waves`` (staged rollouts, hub/rollout/): per model at most one entry naming the devices that
    take another version than the group's entry; :meth:`for_device` resolves them for one device.
    A device never sees another device's selection as its own: the selector is its device id."""

    group: str
    models: tuple[DeploymentEntry, ...] = ()
    maintenance_window: str | None = None
    """``HH:MM-HH:MM`` UTC during which swaps may happen; None means any time."""
    policy: str | None = None
    """The access policy (``policies/<name>.json``) the group's devices apply. A device installs
    only the policies its groups' deployments name, never every signed policy."""
    waves: tuple[WaveEntry, ...] = ()
    mirrors: tuple[str, ...] = ()
    """HTTP(S) mirrors of the repository's ``targets/`` tree the group's devices may fetch model
    bytes from (after their own ``[hub] mirrors``, before MQTT). Untrusted: every chunk is
    checked against the signed hashes; signing the list only says where to look."""

    def __post_init__(self) -> None:
        _check(bool(_ID.fullmatch(self.group)), f"bad group name {self.group!r}")
        named = {m.model for m in self.models}
        for w in self.waves:
            _check(w.model in named, f"wave for {w.model!r}, which the deployment does not name")
        _check(len({w.model for w in self.waves}) == len(self.waves), "two waves for one model")
        _check(sum(len(w.devices) for w in self.waves) <= MAX_WAVE_DEVICES, "waves name too many devices")
        _check(self.policy is None or bool(_ID.fullmatch(self.policy)), f"bad policy name {self.policy!r}")
        ids = [m.model for m in self.models]
        _check(len(ids) == len(set(ids)), "a model appears twice in the deployment")
        _check(sum(m.pin for m in self.models) <= 1, "at most one model can be pinned")
        _check(isinstance(self.mirrors, tuple) and len(self.mirrors) <= 16, "at most 16 mirrors")
        for url in self.mirrors:
            try:
                check_mirror_url(url)
            except ValueError as exc:
                raise ManifestError(str(exc)) from None
        _check(
            self.maintenance_window is None
            or bool(
                re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", self.maintenance_window)
            ),
            f"maintenance_window must be HH:MM-HH:MM, got {self.maintenance_window!r}",
        )

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "group": self.group,
            "maintenance_window": self.maintenance_window,
            "models": [asdict(m) for m in self.models],
        }
        if self.policy is not None:  # absent otherwise: older deployments keep their bytes
            data["policy"] = self.policy
        if self.waves:
            data["waves"] = [
                {"devices": list(w.devices), "model": w.model, "version": w.version} for w in self.waves
            ]
        if self.mirrors:  # likewise
            data["mirrors"] = list(self.mirrors)
        return canonical_json(data)

    def for_device(self, device_id: str) -> Deployment:
        """What ``device_id`` must hold: each model's wave version when the wave names the device,
        the group's entry otherwise (pin kept); the result has no waves."""
        chosen = {w.model: w.version for w in self.waves if device_id in w.devices}
        if not self.waves:
            return self
        models = tuple(DeploymentEntry(m.model, chosen.get(m.model, m.version), m.pin) for m in self.models)
        return replace(self, models=models, waves=())

    @classmethod
    def from_json(cls, raw: bytes | str) -> Deployment:
        data = load_json_object(raw, "deployment")
        unknown = set(data) - {"group", "models", "maintenance_window", "policy", "waves", "mirrors"}
        if unknown:
            raise ManifestError(f"unknown deployment fields: {', '.join(sorted(unknown))}")
        mirrors = data.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise ManifestError("deployment mirrors must be a list of URLs")
        models = data.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise ManifestError("deployment models must be a list of objects")
        waves = data.get("waves", [])
        if not isinstance(waves, list) or not all(isinstance(w, dict) for w in waves):
            raise ManifestError("deployment waves must be a list of objects")
        try:
            return cls(
                group=data.get("group", ""),
                models=tuple(DeploymentEntry(**m) for m in models),
                maintenance_window=data.get("maintenance_window"),
                policy=data.get("policy"),
                waves=tuple(
                    WaveEntry(
                        w.get("model", ""),
                        w.get("version", ""),
                        tuple(w.get("devices", [])) if isinstance(w.get("devices"), list) else (),
                    )
                    for w in waves
                    if _only(w, {"model", "version", "devices"})
                ),
                mirrors=tuple(mirrors),
            )
        except TypeError as exc:
            raise ManifestError(f"deployment: {exc}") from None

    def with_model(self, entry: DeploymentEntry) -> Deployment:
        """Add or replace ``entry``; pinning it unpins every other model."""
        others = tuple(
            DeploymentEntry(m.model, m.version, m.pin and not entry.pin)
            for m in self.models
            if m.model != entry.model
        )
        waves = tuple(w for w in self.waves if w.model != entry.model)
        return replace(self, models=(*others, entry), waves=waves)

    def with_waves(self, waves: tuple[WaveEntry, ...]) -> Deployment:
        return replace(self, waves=waves)


def _only(data: Mapping[str, Any], keys: set[str]) -> bool:
    unknown = set(data) - keys
    if unknown:
        raise ManifestError(f"unknown deployment wave fields: {', '.join(sorted(unknown))}")
    return True


# --- target paths ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetRef:
    """A parsed, safe target path."""

    kind: Literal["model", "policy", "deployment"]
    path: str
    name: str
    """model id, policy name or group"""
    version: str | None = None
    file_name: str | None = None


def model_target_path(model_id: str, version: str, file_name: str) -> str:
    return f"models/{model_id}/{version}/{file_name}"


def policy_target_path(name: str) -> str:
    return f"policies/{name}.json"


def deployment_target_path(group: str) -> str:
    return f"deployments/{group}.json"


def parse_target_path(path: str) -> TargetRef:
    """Parse a target path; raise :class:`Refused` (``bad_path``) for anything unexpected."""

    def bad(why: str) -> Refused:
        return Refused(f"target path {path!r}: {why}", reason=Reason.BAD_PATH)

    if not isinstance(path, str) or not path:
        raise bad("empty")
    if len(path) > 400:
        raise bad("longer than 400 characters")
    if path.startswith("/") or "\\" in path:
        raise bad("absolute paths and backslashes are not allowed")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("empty, '.' or '..' segments are not allowed")
    for p in parts:
        if not _NAME.fullmatch(p):
            raise bad(f"segment {p!r} has characters outside [A-Za-z0-9._-] or starts with a dot")
    head = parts[0]
    if head == "models" and len(parts) == 4:
        _, model_id, version, file_name = parts
        if not _ID.fullmatch(model_id) or not _VERSION.fullmatch(version):
            raise bad("model id or version is not valid")
        return TargetRef("model", path, model_id, version, file_name)
    if head in ("policies", "deployments") and len(parts) == 2 and parts[1].endswith(".json"):
        name = parts[1].removesuffix(".json")
        if not _ID.fullmatch(name):
            raise bad("name is not valid")
        return TargetRef("policy" if head == "policies" else "deployment", path, name)
    raise bad("expected models/<id>/<version>/<file>, policies/<name>.json or deployments/<group>.json")


# --- bytes -----------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, UTF-8): the same document, the same hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def load_json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """Parse a signed document: at most :data:`DOCUMENT_MAX_BYTES`, valid JSON, an object;
    anything else is a :class:`ManifestError` that names ``what``."""
    if len(raw) > DOCUMENT_MAX_BYTES:
        raise ManifestError(f"{what} is larger than {DOCUMENT_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{what} must be a JSON object")
    return data


@dataclass(frozen=True, slots=True)
class FileDigest:
    """Size, whole-file sha256 and per-chunk sha256 of one file."""

    size: int
    sha256: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]


def digest_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileDigest:
    """Hash a file in one pass: the whole file and each ``chunk_size`` chunk."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return FileDigest(size, whole.hexdigest(), chunk_size, tuple(chunks))


__all__ = [
    "CUSTOM_MAX_BYTES",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EXPIRY",
    "DOCUMENT_MAX_BYTES",
    "METADATA_MAX_BYTES",
    "SIZE_CLASS_BOUNDS",
    "TOP_LEVEL_ROLES",
    "CompanionFile",
    "Deployment",
    "DeploymentEntry",
    "MAX_WAVE_DEVICES",
    "WaveEntry",
    "FileDigest",
    "ModelFormat",
    "ModelManifest",
    "SizeClass",
    "TargetKind",
    "TargetRef",
    "Task",
    "canonical_json",
    "check_custom_size",
    "deployment_target_path",
    "digest_file",
    "load_json_object",
    "model_target_path",
    "parse_target_path",
    "policy_target_path",
    "size_class",
]
