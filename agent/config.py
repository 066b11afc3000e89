"""Settings of the agent, loaded through pydantic-settings.

Precedence, highest first: environment variables (``EDGE_AGENT_...``, nested with ``__``, e.g.
``EDGE_AGENT_SERVER__SOCKET_MODE=0600``), then the TOML file (``--config``, else
``/etc/edge-agent/config.toml`` when it exists), then the built-in defaults, which run the demo
under ``./var``.

Invariants: this is the only module that imports pydantic-settings; every setting has a default
and is documented in ``config.example.toml``; a bad value raises :class:`ConfigError` whose message
is one line naming the key, the value and what was expected. Unknown keys are refused, so a typo
in a config file is not silently ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/edge-agent/config.toml")
MAX_CONFIG_BYTES = 1 << 20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSettings(_Section):
    """The local API on the Unix socket."""

    socket_path: Path | None = None
    """Defaults to ``<state_dir>/run/edge-agent.sock``."""
    socket_mode: int = 0o660
    socket_group: str | None = None
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    max_header_bytes: int = Field(default=16 << 10, ge=1024, le=1 << 20)
    keepalive_timeout_s: float = Field(default=75.0, gt=0, le=3600)
    # Connection limits, enforced by agent/server/limits.py (see docs/api.md).
    max_connections: int = Field(default=256, ge=1, le=65536)
    max_headers: int = Field(default=64, ge=8, le=1024)
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    write_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            if not text or any(c not in "01234567" for c in text):
                raise ValueError("expected an octal file mode such as '0660'")
            return int(text, 8)
        return value

    @field_validator("socket_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError("expected a file mode between 0000 and 0777")
        if value & 0o600 != 0o600:
            raise ValueError("expected a mode that lets the owner read and write (at least 0600)")
        return value


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: JSON lines when stdout is not a terminal (journald), console otherwise."""


KvCacheType = Literal["f16", "bf16", "q8_0", "q4_0"]
"""KV cache element types the engine accepts (``[engine] kv_cache_type_k`` / ``kv_cache_type_v``)."""
QUANTIZED_KV_TYPES = frozenset({"q8_0", "q4_0"})
"""Block-quantized KV types: as V they need flash attention in llama.cpp."""


class EngineSettings(_Section):
    n_threads: int | None = Field(default=None, ge=1, le=1024)
    """Defaults to the number of physical cores."""
    n_ctx: int = Field(default=4096, ge=128, le=1 << 20)
    n_batch: int = Field(default=512, ge=16, le=1 << 16)
    max_queue: int = Field(default=16, ge=1, le=100_000)
    """Requests waiting beyond those being decoded; more gets 429 with Retry-After."""
    request_timeout_s: float = Field(default=300.0, gt=0)
    default_max_tokens: int = Field(default=256, ge=1)
    n_parallel: int = Field(default=4, ge=1, le=256)
    """Sequences decoded together in one batch (continuous batching slots); they share n_ctx."""
    prefill_chunk: int = Field(default=256, ge=1, le=1 << 16)
    """Prompt tokens processed per step while other sequences are generating."""
    batch_invariant: bool = False
    """True: plain CPU kernels, no flash attention, prefix reuse in whole prompt chunks, so a
    stream's greedy output does not depend on its batch neighbours or on reuse. False (fast):
    llama.cpp's defaults and token-exact prefix reuse."""
    kv_unified: bool = False
    """True: the slots share n_ctx cells; False: each slot has its own n_ctx cells (more memory)."""
    kv_cache_type_k: KvCacheType = "f16"
    """Element type of the KV cache's keys (``q8_0``/``q4_0``: llama.cpp's block quantization)."""
    kv_cache_type_v: KvCacheType = "f16"
    """Element type of the values; a quantized one needs flash attention (see the validator)."""

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> EngineSettings:
        # llama.cpp refuses a quantized V cache without flash attention, and the batch-invariant
        # kernel set turns flash attention off (docs/engine.md): refuse the pair here, by name.
        if self.kv_cache_type_v in QUANTIZED_KV_TYPES and self.batch_invariant:
            raise ValueError(
                f"engine.kv_cache_type_v = {self.kv_cache_type_v!r} needs flash attention, which "
                "engine.batch_invariant = true turns off; set batch_invariant = false or a "
                "kv_cache_type_v of 'f16' or 'bf16' (kv_cache_type_k may be quantized either way)"
            )
        return self

    cpu_sharing: Literal["split", "turns", "off"] = "split"
    """How generation and embeddings share the cores (docs/engine.md, *Sharing the cores*):
    ``split``: while an embedding computes, generation steps leave it ``embed_threads``;
    ``turns``: one native call at a time, alternating; ``off``: side by side, uncoordinated."""
    thread_wait: Literal["spin", "passive"] = "spin"
    """How llama.cpp's (OpenMP) threads wait at the barrier after each operator: ``spin`` (libgomp's
    default) or ``passive`` (sleep at once: far faster when other work shares the cores; docs/engine.md).
    Read once, before the first model loads; an ``OMP_WAIT_POLICY`` in the environment wins."""
    embed_threads: int | None = Field(default=None, ge=1, le=1024)
    """Threads of embedding compute (onnxruntime intra-op, llama embedding context); default 1
    with ``cpu_sharing = "split"``, else n_threads."""
    prompt_cache: bool = True
    """Keep the KV cells of long prompts under ``<state_dir>/prompt-cache`` across restarts."""
    prompt_cache_min_tokens: int = Field(default=512, ge=16, le=1 << 20)
    """A finished request is saved only if it adds this many tokens of prefix to the cache."""
    prompt_cache_max_mb: int = Field(default=1024, ge=1, le=1 << 20)
    """Size cap of the prompt cache directory; least recently used files go first."""


class IsolationSettings(_Section):
    """Crash isolation (:mod:`agent.engine.isolation`): a model is tried in a child process first."""

    enabled: bool = True
    """Try each model file in a child process the first time it is served with these engine settings
    and this llama.cpp build; a child that crashes or hangs refuses the model. Off: load directly."""
    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    """A trial still running after this long is killed and the model refused (``timeout``)."""


class EmbeddingSettings(_Section):
    """An embedding model served next to the generative one (ONNX or GGUF)."""

    path: Path | None = None
    """An ``.onnx`` sentence-embedding model or a ``.gguf`` embedding model."""
    id: str | None = None
    tokenizer: Path | None = None
    """ONNX only: a Hugging Face tokenizer.json (default: next to the model, else packaged)."""
    max_length: int = Field(default=256, ge=8, le=8192)
    batch_size: int = Field(default=32, ge=1, le=1024)
    max_queue: int = Field(default=8, ge=0, le=100_000)
    """Embedding requests waiting per model (any model's /v1/embeddings) beyond the one computing;
    more get 429 with Retry-After."""
    max_wait_s: float = Field(default=1.0, gt=0, le=86_400)
    """A request is also refused (429) when the inputs ahead of it would take longer than this to
    compute at the model's measured speed; one arriving when none is in flight always runs."""


class ModelSettings(_Section):
    path: Path | None = None
    """Serve this GGUF file directly (development); otherwise the model store under state_dir."""
    id: str | None = None
    chat_template: str | None = None


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class ServiceSettings(_Section):
    """Running as a service: systemd notifications and the scheduler of periodic jobs."""

    notify: bool = True
    """Send sd_notify messages (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) when $NOTIFY_SOCKET is set."""
    jitter_s: float = Field(default=30.0, ge=0, le=3600)
    """Each periodic job fires up to this many seconds late, so a fleet does not act in lockstep."""
    maintenance_window: str | None = None
    """``HH:MM-HH:MM`` local time (may wrap midnight); heavy jobs (re-hash, GC) only run inside it."""
    intervals_s: dict[str, float] = Field(default_factory=dict)
    """Per-job interval overrides by job name, e.g. ``{ rehash = 43200 }``."""

    @field_validator("maintenance_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW.match(value.strip()):
            raise ValueError("expected a window such as '02:00-04:30' (24-hour HH:MM-HH:MM)")
        return value.strip() if value is not None else None

    @field_validator("intervals_s")
    @classmethod
    def _intervals(cls, value: dict[str, float]) -> dict[str, float]:
        for name, seconds in value.items():
            if not 1 <= seconds <= 30 * 86400:
                raise ValueError(f"interval of job {name!r} must be between 1 s and 30 days")
        return value


class PoolSettings(_Section):
    """Loaded models: memory budget, idle unload, pins, hot swap."""

    memory_budget_mb: int | None = Field(default=None, ge=16)
    """Models loaded at once must fit this; default: 75% of the memory limit (cgroup or RAM)."""
    keep_alive_s: float = Field(default=300.0, ge=0)
    """A model other than the default and the pinned ones is unloaded after this long unused."""
    max_loaded: int = Field(default=4, ge=1, le=64)
    pinned: list[str] = Field(default_factory=list)
    """Model ids kept loaded whatever their use."""
    smoke_test: bool = True
    """A newly selected model must generate a few tokens before it replaces the current one."""
    drain_timeout_s: float = Field(default=300.0, gt=0)
    """After a swap, the old model serves its in-flight requests for at most this long."""
    cold_swap: bool = True
    """A new model that fits only in place of the current default replaces it (a brief 503 window,
    the previous model loaded again if the new one fails); off: such a swap is refused."""


class MetricsSettings(_Section):
    enabled: bool = True
    """Serve ``GET /metrics`` (Prometheus text format)."""
    latency_buckets_s: list[float] = Field(
        default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
    )

    @field_validator("latency_buckets_s")
    @classmethod
    def _buckets(cls, value: list[float]) -> list[float]:
        if not value or any(b <= 0 for b in value) or sorted(set(value)) != value:
            raise ValueError("expected strictly increasing positive bucket bounds")
        return value


class AuditSettings(_Section):
    """The tamper-evident audit log under ``<state_dir>/audit`` (docs/audit.md)."""

    max_bytes: int = Field(default=256 << 20, ge=1 << 16)
    """Records kept locally (not yet uploaded and pruned) may take this much; then ``on_full``."""
    on_full: Literal["fail_closed", "record_gap"] = "fail_closed"
    """``fail_closed``: refuse requests with 503; ``record_gap``: serve, count what went unrecorded."""
    checkpoint_every: int = Field(default=1000, ge=1)
    """Sign a checkpoint after this many records ..."""
    checkpoint_interval_s: float = Field(default=300.0, gt=0)
    """... or this many seconds after the last one, whichever comes first."""
    audit_reads: bool = False
    """Also record allowed reads (models.list, status, health); denials are always recorded."""
    refusals_per_minute: int = Field(default=30, ge=1, le=100_000)
    """Refused requests (403, and 400/429 over a role limit) recorded one by one per caller (uid)
    and minute; beyond it they are answered 429 and counted onto the caller's next record."""
    synchronous: Literal["full", "normal"] = "full"
    """``full``: each commit is fsynced before the request completes (survives power loss);
    ``normal``: written to the OS before it completes, fsynced at WAL checkpoints (survives a
    crash or kill of the agent, not of the machine; saves one fsync of latency per request)."""


class AccessSettings(_Section):
    """Who may do what through the local API. Default: root and the daemon's own user are admins;
    the socket's group may infer, embed, list models and read the status (docs/audit.md)."""

    policy_file: Path | None = None
    """A JSON policy document (the format the hub publishes) replacing the default."""
    roles: dict[str, Any] = Field(default_factory=dict)
    """Inline policy: ``[access.roles.<name>]`` with ``permissions`` and ``limits``."""
    bindings: list[dict[str, Any]] = Field(default_factory=list)
    """Inline policy: ``[[access.bindings]]`` with ``role`` and ``users``/``groups``/``uids``."""

    @field_validator("bindings")
    @classmethod
    def _policy(cls, value: list[dict[str, Any]], info: Any) -> list[dict[str, Any]]:
        roles = info.data.get("roles") or {}
        if roles or value:
            from agent.policy import PolicyError, parse_policy

            try:
                parse_policy({"roles": roles, "bindings": value}, "config [access]")
            except PolicyError as exc:
                raise ValueError(str(exc)) from None
        return value


class SelectionSettings(_Section):
    """Which model this box serves: the best that fits, re-checked at run time (docs/selection.md)."""

    headroom_mb: int = Field(default=256, ge=0, le=1 << 20)
    """Memory left free for the OS and other services, subtracted from the available memory."""
    speed_floor_tps: float = Field(default=2.0, ge=0, le=10_000)
    """Generation tokens/s a model must reach (measured by ``edge-agent bench``, else estimated)."""
    pin: str | None = None
    """Serve this model id whatever the ranking says (the memory budget still applies)."""
    reprobe_interval_s: float = Field(default=300.0, ge=5, le=86400)
    """Re-probe memory and temperature this often; may switch model (with hysteresis)."""
    down_after: int = Field(default=2, ge=1, le=100)
    """Consecutive probes under memory pressure or throttling before moving to a smaller model."""
    up_after: int = Field(default=5, ge=1, le=1000)
    """Consecutive calm probes before moving back to a bigger model."""
    min_switch_interval_s: float = Field(default=600.0, ge=0, le=7 * 86400)
    """No move to a bigger model sooner than this after a switch."""
    auto_switch: bool = True
    """Act on re-probes; ``false`` only logs what it would do."""


def _not_below(low_field: str, value: float, info: Any) -> float:
    """A maximum must not be below its section's minimum ``low_field`` (already validated)."""
    low = info.data.get(low_field)
    if low is not None and value < low:
        raise ValueError(f"must be at least {low_field}")
    return value


class HubSettings(_Section):
    """Fleet sync over MQTT (docs/protocol.md). Off unless ``host`` is set; the agent serves
    locally whether or not the hub is reachable."""

    host: str | None = None
    port: int = Field(default=8883, ge=1, le=65535)
    ca_file: Path | None = None
    """CA certificate that signed the broker's certificate."""
    cert_file: Path | None = None
    """This device's client certificate; its CN must be the device id (the broker's ACL uses it)."""
    key_file: Path | None = None
    device_id: str | None = None
    """Defaults to the id given at enrollment (``edge-agent registry enroll``)."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    session_expiry_s: int = Field(default=7 * 86400, ge=0, le=0xFFFFFFFF)
    backoff_min_s: float = Field(default=1.0, gt=0, le=600)
    backoff_max_s: float = Field(default=300.0, gt=0, le=86400)
    refresh_interval_s: float = Field(default=900.0, ge=5, le=86400)
    """Metadata refresh when no new timestamp was announced in the meantime."""
    chunk_window: int = Field(default=8, ge=1, le=64)
    """Chunk requests in flight during a model transfer."""
    chunk_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    audit_batch: int = Field(default=1000, ge=1, le=10000)
    state_interval_s: float = Field(default=60.0, ge=1, le=86400)
    mirrors: list[str] = Field(default_factory=list, max_length=16)
    """HTTP(S) mirrors of the repository's ``targets/`` tree, asked in order before MQTT chunks
    (untrusted: every chunk is checked against the signed metadata). The signed deployments of
    this box's groups may name more (asked after these)."""
    mirror_ca_file: Path | None = None
    """CA certificates for HTTPS mirrors; the system CA store when unset."""
    mirror_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """Connect, and read one chunk, within this long, or the mirror is skipped for the transfer."""
    max_download_bytes_per_s: int | None = Field(default=None, ge=1024)
    """Model transfer rate limit for this box (MQTT chunks and mirrors together); none when unset."""
    download_window: str | None = None
    """``HH:MM-HH:MM`` UTC (may wrap midnight; a deployment's maintenance window syntax): model
    bytes are fetched only inside it; a transfer pauses at a chunk boundary when it closes."""

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, value: list[str]) -> list[str]:
        from registry.metadata import check_mirror_url

        for url in value:
            check_mirror_url(url)
        return value

    @field_validator("mirror_ca_file")
    @classmethod
    def _mirror_ca(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("download_window")
    @classmethod
    def _download_window(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW.match(value):
            raise ValueError("expected a window such as '01:00-05:00' (24-hour HH:MM-HH:MM, UTC)")
        return value

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff(cls, value: float, info: Any) -> float:
        return _not_below("backoff_min_s", value, info)

    @field_validator("key_file")
    @classmethod
    def _tls_complete(cls, value: Path | None, info: Any) -> Path | None:
        if info.data.get("host") and not (info.data.get("ca_file") and info.data.get("cert_file") and value):
            raise ValueError("a hub host needs ca_file, cert_file and key_file (TLS client certificate)")
        return value


class SyncSettings(_Section):
    """What fleet sync does with deployments (docs/protocol.md, "Deployments and policies")."""

    retry_initial_s: float = Field(default=300.0, ge=1, le=86400)
    """A failed activation is retried after this long, doubling at each failure ..."""
    retry_max_s: float = Field(default=21600.0, ge=1, le=7 * 86400)
    """... up to this long between attempts."""
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    """Each delay is shortened by a random fraction up to this, so a fleet does not retry in step."""
    keep_previous: bool = True
    """Keep the version before the deployed one of each model installed (the rollback target)."""
    removal_grace_s: float = Field(default=3600.0, ge=0, le=30 * 86400)
    """An installed model no longer deployed is deleted from the store after this long."""
    outbox_max_events: int = Field(default=10000, ge=1, le=1_000_000)
    """Events kept while the broker is unreachable; the oldest are dropped (and counted) beyond."""

    @field_validator("retry_max_s")
    @classmethod
    def _retry_cap(cls, value: float, info: Any) -> float:
        return _not_below("retry_initial_s", value, info)


class Settings(BaseSettings):
    """All settings. Construct through :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Path("var")
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    engine: EngineSettings = EngineSettings()
    isolation: IsolationSettings = IsolationSettings()
    model: ModelSettings = ModelSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    audit: AuditSettings = AuditSettings()
    access: AccessSettings = AccessSettings()
    service: ServiceSettings = ServiceSettings()
    pool: PoolSettings = PoolSettings()
    metrics: MetricsSettings = MetricsSettings()
    selection: SelectionSettings = SelectionSettings()
    hub: HubSettings = HubSettings()
    sync: SyncSettings = SyncSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file's contents arrive as init kwargs; the environment overrides them.
        return (env_settings, init_settings)

    @property
    def socket_path(self) -> Path:
        return self.server.socket_path or self.state_dir / "run" / "edge-agent.sock"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


def resolve_config_path(explicit: Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``--config`` wins, then ``EDGE_AGENT_CONFIG``, then the system file if it exists."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    if env.get("EDGE_AGENT_CONFIG"):
        return Path(env["EDGE_AGENT_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a bounded TOML file, translating OS and syntax errors into :class:`ConfigError`."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config error ({path}): cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error ({path}): larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config error ({path}): not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error ({path}): invalid TOML: {exc}") from None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``<source>: <key> = <value>: <expected>`` for the first problem (+ a count)."""
    problems = err.errors(include_url=False)
    first = problems[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        expected = "unknown setting"
    elif first["type"] == "missing":
        expected = "required setting is missing"
    else:
        expected = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{source}: {key} = {shown}: {expected}{more}"


def load_settings(config: Path | None = None) -> Settings:
    """Load settings from the resolved file and ``os.environ``; raise :class:`ConfigError`."""
    path = resolve_config_path(config)
    data = read_toml(path) if path is not None else {}
    source = f"config error ({path})" if path is not None else "config error"
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


__all__ = [
    "AccessSettings",
    "AuditSettings",
    "EmbeddingSettings",
    "EngineSettings",
    "HubSettings",
    "IsolationSettings",
    "KvCacheType",
    "LogSettings",
    "MetricsSettings",
    "ModelSettings",
    "PoolSettings",
    "QUANTIZED_KV_TYPES",
    "SelectionSettings",
    "ServerSettings",
    "ServiceSettings",
    "Settings",
    "SyncSettings",
    "format_validation_error",
    "load_settings",
    "read_toml",
    "resolve_config_path",
]
