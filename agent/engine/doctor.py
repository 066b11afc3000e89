"""``edge-agent doctor``: does every tensor type a model may carry run on this CPU with this build?

For each tensor type the registry can deliver (:data:`TENSOR_TYPES`), the doctor builds one tiny
llama-architecture GGUF (F32 weights from a fixed seed, written with the ``gguf`` package's
``GGUFWriter``; dimensions multiples of 256 so that K-quants and the ternary types apply; a small
SPM vocabulary so that every token id is valid), has llama.cpp's own quantizer turn it into that
type (``pure``: every 2-D weight gets exactly that type), loads it and decodes batches of
:data:`BATCH_SIZES` tokens (1 through 512; each followed by one generation step over the cached
batch), once with the plain CPU kernels of the reproducible mode (``[engine] batch_invariant = true``)
and once with llama.cpp's repacked ones (extra buffer types: CPU_REPACK, AMX, ...). Every logits
row must be finite and not constant.

Each type runs in its own child process (``python -m agent.engine.doctor --child TYPE ...``), so a
kernel that dies takes down only its child: the parent reports ``ok``, or the signal by name
(SIGILL, SIGSEGV, SIGBUS, SIGABRT), the error, or ``timeout``, with the last stage the child
started (``repacked kernels, batch 64``), the weight buffers llama.cpp chose for each kernel set
(the CPU features in play: ``AMX``, ``CPU_REPACK``) and llama.cpp's own system line
(``llama_print_system_info``).

Invariants:

* The parent never imports ``llama_cpp``: quantizing and decoding happen only in children, so no
  type can crash the doctor (or a daemon that reads its results).
* A type is ``ok`` only when its child exited 0 after reporting ``done``; anything else (a signal,
  an exit status, an error line, the time limit, a quantized file holding another type than the
  one asked for) is a failure of that type, never a silent pass.
* Results go to ``<state_dir>/doctor.json`` atomically (:func:`registry.files.atomic_write`),
  naming the build they were measured on (:func:`current_build`); results of the same build for
  types not re-run are kept. :func:`failed_types_for` returns failures only for the build that is
  installed now, so a rebuild never inherits the verdicts of another build.
* Generated models are cached in ``<state_dir>/doctor/cache/<llama-cpp-python version>-g<N>/``
  (each file appears under its final name only once complete), so repeated runs are fast; any of
  them may be deleted at any time.

Test-only hook: ``EDGE_AGENT_DOCTOR_TEST_CRASH="TYPE=WHAT[,TYPE=WHAT]"`` makes the child of TYPE,
at its first decode, kill itself with the signal WHAT (``SIGILL``, ``SIGSEGV``, ``SIGBUS``,
``SIGABRT``) or sleep past its time limit (``hang``). It exists so that the tests can make a child
crash for real; nothing in the product sets it, and the report of such a run says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import AgentError, ConfigError
from registry.exceptions import StoreError
from registry.files import atomic_write, temp_name

DOCTOR_FILE = "doctor.json"
"""Under the state directory: the last results (see :func:`load_results`)."""
CACHE_DIR = "doctor/cache"
"""Under the state directory: generated models, by llama-cpp-python version."""
FORMAT_VERSION = 1
GENERATOR_VERSION = 1
"""Bump when the generated model changes, so that cached files are not reused."""
TEST_CRASH_ENV = "EDGE_AGENT_DOCTOR_TEST_CRASH"
"""Test-only (module docstring)."""
MAX_RESULTS_BYTES = 1 << 20
BATCH_SIZES: tuple[int, ...] = (1, 2, 7, 8, 16, 31, 32, 64, 128, 256, 512)
N_BATCH = 512
N_CTX = 1024
DEFAULT_TIMEOUT_S = 60.0

# The generated model: llama architecture, every matrix dimension a multiple of 256.
N_EMBD = 256
N_FF = 512
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_VOCAB = 384
SEED = 20240613
_MARK = "DOCTOR "
"""Prefix of the child's report lines on stdout (anything else there is ignored)."""
_CRASH_SIGNALS = ("SIGILL", "SIGSEGV", "SIGBUS", "SIGABRT")


@dataclass(frozen=True, slots=True)
class TensorType:
    """A ggml tensor type (its name in GGUF headers) and the llama.cpp file type that yields it."""

    name: str
    ftype: str
    """A ``llama_cpp.LLAMA_FTYPE_*`` constant; with ``pure`` every 2-D weight gets :attr:`name`."""


TENSOR_TYPES: tuple[TensorType, ...] = (
    TensorType("F16", "LLAMA_FTYPE_MOSTLY_F16"),
    TensorType("BF16", "LLAMA_FTYPE_MOSTLY_BF16"),
    TensorType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    TensorType("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0"),
    TensorType("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1"),
    TensorType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
    TensorType("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1"),
    TensorType("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K"),
    TensorType("Q3_K", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
    TensorType("Q4_K", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    TensorType("Q5_K", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    TensorType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K"),
    TensorType("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL"),
    TensorType("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS"),
    TensorType("TQ1_0", "LLAMA_FTYPE_MOSTLY_TQ1_0"),
    TensorType("TQ2_0", "LLAMA_FTYPE_MOSTLY_TQ2_0"),
)
"""What the doctor checks: every type of the registry's GGUF targets (K-quant files are made of
Q4_K/Q5_K/Q6_K tensors), the legacy types small K-quant files fall back to, IQ4_NL/IQ4_XS and the
ternary types BitNet-style models use. No type needs an importance matrix."""
TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in TENSOR_TYPES)
_BY_NAME: Mapping[str, TensorType] = {t.name: t for t in TENSOR_TYPES}

Status = Literal["ok", "crashed", "error", "timeout"]


def parse_types(text: str | None) -> tuple[str, ...]:
    """``"q4_0, Q8_0"`` -> ``("Q4_0", "Q8_0")`` in :data:`TENSOR_TYPES` order; None -> all.

    Raises :class:`ConfigError` naming every unknown type (and the known ones).
    """
    if text is None:
        return TYPE_NAMES
    given = [t.strip() for t in text.split(",") if t.strip()]
    wanted = [t.upper() for t in given]
    unknown = [t for t in dict.fromkeys(given) if t.upper() not in _BY_NAME]
    if unknown or not wanted:
        named = ", ".join(repr(u) for u in unknown) or "(none given)"
        raise ConfigError(f"edge-agent doctor: unknown tensor type {named}; known: {', '.join(TYPE_NAMES)}")
    return tuple(t for t in TYPE_NAMES if t in wanted)


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypeResult:
    """One tensor type's outcome on this box."""

    type: str
    status: Status
    seconds: float
    signal: str | None = None
    """The signal's name when the child died by one (``SIGILL``)."""
    stage: str | None = None
    """The last stage the child started (``repacked kernels, batch 64``)."""
    detail: str = ""
    """The error, or the end of the child's stderr when it died."""
    buffers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Kernel set (``plain``, ``repacked``) -> the weight buffer types llama.cpp used."""
    checked_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def summary(self) -> str:
        """``ok``, ``SIGILL``, ``timeout`` or ``error``."""
        if self.status == "crashed" and self.signal:
            return self.signal
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "signal": self.signal,
            "stage": self.stage,
            "detail": self.detail,
            "buffers": {k: list(v) for k, v in self.buffers.items()},
            "checked_at": round(self.checked_at, 3),
        }


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """A doctor run: the results of the types it ran, and what it ran on."""

    build_id: str
    build: Mapping[str, Any] | None
    llama_cpp_version: str
    system_info: str | None
    results: tuple[TypeResult, ...]
    seconds: float
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    test_hook: str | None = None
    """The value of the test-only crash hook when it was set (module docstring)."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> tuple[TypeResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def cpu_features(self) -> tuple[str, ...]:
        """The features llama.cpp was built to use (``AVX2 = 1`` items of its system line)."""
        return system_features(self.system_info or "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "ok": self.ok,
            "build_id": self.build_id,
            "build": dict(self.build) if self.build is not None else None,
            "llama_cpp_version": self.llama_cpp_version,
            "system_info": self.system_info,
            "cpu_features": list(self.cpu_features),
            "batch_sizes": list(self.batch_sizes),
            "seconds": round(self.seconds, 3),
            "test_hook": self.test_hook,
            "failed_types": [r.type for r in self.failed],
            "types": {r.type: r.to_dict() for r in self.results},
        }


def system_features(system_info: str) -> tuple[str, ...]:
    """``"CPU : SSE3 = 1 | AVX = 1 | AMX_INT8 = 0 |"`` -> ``("AVX", "SSE3")`` (the ones set)."""
    found = re.findall(r"([A-Za-z0-9_]+)\s*=\s*1\b", system_info)
    return tuple(sorted(set(found)))


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, read without importing it (None: not installed)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def current_build(
    record_fn: Callable[[], Mapping[str, Any] | None] | None = None,
) -> tuple[str, Mapping[str, Any] | None]:
    """(build id, build record): the install script's record when present, else the version.

    The record (:func:`agent.hardware.build_profile.installed_record`) names the profile and the
    CPU features the build assumes; without it the build id is ``llama-cpp-python-<version>``.
    """
    from agent.hardware.build_profile import installed_build

    if record_fn is None:
        return installed_build()
    record = record_fn()
    return installed_build(dict(record)) if record is not None else (installed_build({})[0], None)


def results_path(state_dir: Path) -> Path:
    return state_dir / DOCTOR_FILE


def load_results(state_dir: Path) -> dict[str, Any] | None:
    """The stored results (bounded read); None when absent, unreadable or not ours. Never raises."""
    try:
        with results_path(state_dir).open("rb") as fh:
            raw = fh.read(MAX_RESULTS_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_RESULTS_BYTES else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        return None
    if not isinstance(data.get("types"), dict):
        return None
    return data


def failed_types_for(state_dir: Path, build_id: str | None = None) -> frozenset[str]:
    """Tensor types that failed the doctor with the build installed now (or ``build_id``).

    Empty when the doctor has not run, or ran on another build. Never raises.
    """
    data = load_results(state_dir)
    if data is None:
        return frozenset()
    if build_id is None:
        try:
            build_id = current_build()[0]
        except Exception:  # the record reader is another module's; a failure means "unknown"
            return frozenset()
    if data.get("build_id") != build_id:
        return frozenset()
    failed = set()
    for name, entry in data["types"].items():
        if isinstance(entry, dict) and entry.get("status") != "ok":
            failed.add(str(name))
    return frozenset(failed)


def save_results(state_dir: Path, report: DoctorReport) -> dict[str, Any]:
    """Write ``doctor.json``: this run's results over the stored ones of the same build; returns it."""
    data = report.to_dict()
    previous = load_results(state_dir)
    if previous is not None and previous.get("build_id") == report.build_id:
        merged = {k: v for k, v in previous["types"].items() if k in _BY_NAME and isinstance(v, dict)}
        merged.update(data["types"])
        data["types"] = {k: merged[k] for k in TYPE_NAMES if k in merged}
        data["failed_types"] = [k for k, v in data["types"].items() if v.get("status") != "ok"]
        data["ok"] = not data["failed_types"]
    try:
        atomic_write(results_path(state_dir), (json.dumps(data, indent=2) + "\n").encode())
    except StoreError as exc:
        raise AgentError(f"cannot store the doctor's results: {exc}") from None
    return data


# --- the generated model --------------------------------------------------------------------------


def cache_dir(state_dir: Path, version: str) -> Path:
    return state_dir / CACHE_DIR / f"{version}-g{GENERATOR_VERSION}"


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces up to :data:`N_VOCAB`."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # gguf.TokenType: UNKNOWN, CONTROL, BYTE
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    pieces += [f"\u2581{a}{b}" for a in letters for b in letters]
    for piece in pieces[: N_VOCAB - len(tokens)]:
        tokens.append(piece)
        types.append(1)  # NORMAL
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_base_model(path: Path) -> Path:
    """Write the F32 model every type is quantized from (atomically; deterministic content)."""
    import gguf
    import numpy as np

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    head_dim = N_EMBD // N_HEAD
    n_kv = head_dim * N_HEAD_KV

    def weight(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols)) * (1.0 / cols**0.5)).astype(np.float32)

    def norm() -> Any:
        return (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32)

    tmp = temp_name(path.parent, "base")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name("edge-agent doctor")
        w.add_context_length(N_CTX * 2)
        w.add_embedding_length(N_EMBD)
        w.add_block_count(N_LAYER)
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD_KV)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0)  # ALL_F32
        tokens, scores, types = _vocabulary()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        # numpy shapes are (rows, columns); ggml's ne[0] is the column count (the row length).
        w.add_tensor("token_embd.weight", weight(N_VOCAB, N_EMBD))
        for il in range(N_LAYER):
            w.add_tensor(f"blk.{il}.attn_norm.weight", norm())
            w.add_tensor(f"blk.{il}.attn_q.weight", weight(N_EMBD, N_EMBD))
            w.add_tensor(f"blk.{il}.attn_k.weight", weight(n_kv, N_EMBD))
            w.add_tensor(f"blk.{il}.attn_v.weight", weight(n_kv, N_EMBD))
            w.add_tensor(f"blk.{il}.attn_output.weight", weight(N_EMBD, N_EMBD))
            w.add_tensor(f"blk.{il}.ffn_norm.weight", norm())
            w.add_tensor(f"blk.{il}.ffn_gate.weight", weight(N_FF, N_EMBD))
            w.add_tensor(f"blk.{il}.ffn_up.weight", weight(N_FF, N_EMBD))
            w.add_tensor(f"blk.{il}.ffn_down.weight", weight(N_EMBD, N_FF))
        w.add_tensor("output_norm.weight", norm())
        w.add_tensor("output.weight", weight(N_VOCAB, N_EMBD))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


# --- the parent -----------------------------------------------------------------------------------


def _parse_lines(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            with contextlib.suppress(ValueError):
                event = json.loads(line[len(_MARK) :])
                if isinstance(event, dict):
                    events.append(event)
    return events


def _tail(text: str, lines: int = 6, chars: int = 600) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join(kept)[-chars:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def interpret(
    type_name: str,
    returncode: int | None,
    stdout: str,
    stderr: str,
    seconds: float,
    *,
    timed_out: bool = False,
    timeout_s: float = 0.0,
) -> tuple[TypeResult, str | None]:
    """A child's outcome -> (result, llama.cpp's system line if the child reported it). Pure."""
    events = _parse_lines(stdout)
    stage: str | None = None
    system_info: str | None = None
    buffers: dict[str, tuple[str, ...]] = {}
    error: str | None = None
    done = False
    for ev in events:
        kind = ev.get("event")
        if kind == "stage":
            stage = str(ev.get("stage"))
        elif kind == "system_info":
            system_info = str(ev.get("text", "")).strip()
        elif kind == "buffers":
            buffers[str(ev.get("kernels"))] = tuple(str(b) for b in ev.get("buffers", ()))
        elif kind == "error":
            error = str(ev.get("message"))
        elif kind == "done":
            done = True
    now = time.time()
    common: dict[str, Any] = {"seconds": seconds, "stage": stage, "buffers": buffers, "checked_at": now}
    if timed_out:
        detail = f"no result within {timeout_s:g} s"
        return TypeResult(type_name, "timeout", detail=detail, **common), system_info
    if returncode is not None and returncode < 0:
        name = _signal_name(-returncode)
        return TypeResult(type_name, "crashed", signal=name, detail=_tail(stderr), **common), system_info
    if returncode == 0 and done and error is None:
        return TypeResult(type_name, "ok", **common), system_info
    detail = error or _tail(stderr) or f"the child exited with status {returncode} without a result"
    return TypeResult(type_name, "error", detail=detail, **common), system_info


def run_type(
    type_name: str,
    base: Path,
    out_dir: Path,
    *,
    threads: int,
    timeout_s: float,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> tuple[TypeResult, str | None]:
    """Run one type in a child process and interpret how it ended."""
    cmd = [
        sys.executable,
        "-m",
        "agent.engine.doctor",
        "--child",
        type_name,
        "--base",
        str(base),
        "--out",
        str(out_dir / f"doctor-{type_name.lower()}.gguf"),
        "--threads",
        str(threads),
        "--batches",
        ",".join(str(n) for n in batch_sizes),
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        spent = time.monotonic() - started
        return interpret(type_name, None, out, err, spent, timed_out=True, timeout_s=timeout_s)
    spent = time.monotonic() - started
    return interpret(type_name, proc.returncode, proc.stdout, proc.stderr, spent)


def run_doctor(
    state_dir: Path,
    types: Iterable[str] = TYPE_NAMES,
    *,
    threads: int = 1,
    jobs: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    save: bool = True,
) -> DoctorReport:
    """Run every type in ``types`` (each in a child, ``jobs`` at a time) and store the results.

    Raises :class:`AgentError` when llama-cpp-python is not installed or the model cannot be
    written; a type that fails is a result, not an exception.
    """
    wanted = list(types)
    names = [t for t in wanted if t in _BY_NAME]
    unknown = [t for t in wanted if t not in _BY_NAME]
    if unknown:
        raise ConfigError(f"edge-agent doctor: unknown tensor type {', '.join(map(repr, unknown))}")
    version = llama_cpp_version()
    if version is None or importlib.util.find_spec("llama_cpp") is None:
        raise AgentError("doctor: llama-cpp-python is not installed in this environment")
    if any(not 1 <= n <= N_BATCH for n in batch_sizes):
        raise ConfigError(f"edge-agent doctor: batch sizes must be within 1..{N_BATCH}")
    build_id, record = current_build()
    started = time.monotonic()
    directory = cache_dir(state_dir, version)
    try:
        base = write_base_model(directory / "doctor-f32.gguf")
    except OSError as exc:
        raise AgentError(f"doctor: cannot write the test model in {directory}: {exc}") from None
    workers = jobs or max(1, min(4, (os.cpu_count() or 1) // max(1, threads)))

    def one(name: str) -> tuple[TypeResult, str | None]:
        return run_type(name, base, directory, threads=threads, timeout_s=timeout_s, batch_sizes=batch_sizes)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(one, names))
    system_info = next((info for _, info in outcomes if info), None)
    report = DoctorReport(
        build_id=build_id,
        build=record,
        llama_cpp_version=version,
        system_info=system_info,
        results=tuple(r for r, _ in outcomes),
        seconds=time.monotonic() - started,
        batch_sizes=tuple(batch_sizes),
        test_hook=os.environ.get(TEST_CRASH_ENV) or None,
    )
    if save:
        save_results(state_dir, report)
    return report


def failure_message(report: DoctorReport) -> str:
    """What the operator reads when types failed: which, how, and what to do."""
    how = "; ".join(f"{r.type} {r.summary}" + (f" at {r.stage}" if r.stage else "") for r in report.failed)
    profile = (report.build or {}).get("profile")
    if profile == "safe":
        advice = "EDGE_AGENT_LLAMA_PROFILE=portable (the safe profile is what failed)"
    else:
        advice = "EDGE_AGENT_LLAMA_PROFILE=safe (or portable, for any CPU)"
    return (
        f"tensor types {', '.join(r.type for r in report.failed)} failed on this build ({how}). "
        f"Models made of them will not be selected here. Rebuild llama-cpp-python with {advice} "
        'and run `edge-agent doctor` again; see docs/operations.md, "llama.cpp build profiles" '
        'and "edge-agent doctor".'
    )


# --- the child ------------------------------------------------------------------------------------


def _emit(**event: Any) -> None:
    sys.stdout.write(_MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def _test_crash(type_name: str) -> str | None:
    """The test-only hook (module docstring): what this child must do to itself, if anything."""
    for item in os.environ.get(TEST_CRASH_ENV, "").split(","):
        name, _, what = item.partition("=")
        if name.strip().upper() == type_name:
            return what.strip()
    return None


def _crash(what: str) -> None:
    if what == "hang":
        time.sleep(3600)
    if what not in _CRASH_SIGNALS:
        raise SystemExit(f"{TEST_CRASH_ENV}: unknown action {what!r}")
    os.kill(os.getpid(), signal.Signals[what])


class _LogCapture:
    """llama.cpp's log lines, kept to find the buffers the weights went to; errors go to stderr."""

    def __init__(self, lib: Any) -> None:
        import ctypes

        self.text: list[str] = []

        def forward(level: int, text: bytes, _user: Any) -> None:
            piece = text.decode("utf-8", "replace") if text else ""
            self.text.append(piece)
            if level == 4 and piece:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(piece)

        self._callback = lib.llama_log_callback(forward)  # kept alive for the C side
        lib.llama_log_set(self._callback, ctypes.c_void_p(0))

    def take_buffers(self) -> tuple[str, ...]:
        found = re.findall(r"(\S+) model buffer size", "".join(self.text))
        self.text.clear()
        return tuple(sorted(set(found)))


def _quantize(lib: Any, spec: TensorType, base: Path, out: Path, threads: int) -> None:
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, spec.ftype)
    params.pure = True
    params.nthread = threads
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out.parent, out.stem)
    try:
        rc = lib.llama_model_quantize(str(base).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise AgentError(f"llama.cpp could not quantize the test model to {spec.name} (status {rc})")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_types(path: Path, wanted: str) -> None:
    """Every 2-D weight of ``path`` must be of type ``wanted`` (1-D norms stay F32)."""
    from registry.gguf_info import read_gguf_info

    info = read_gguf_info(path)
    other = sorted(set(info.bytes_by_type) - {wanted, "F32"})
    if other or wanted not in info.bytes_by_type:
        raise AgentError(f"the quantized test model holds {', '.join(other) or 'no'} {wanted} tensors")


def _decode_all(
    lib: Any, ctx: Any, batch: Any, n_vocab: int, n: int, rng: random.Random, crash: str | None
) -> None:
    """Decode ``n`` tokens (every row an output), then one more over them; check every row."""
    import numpy as np

    tokens = [1] + [rng.randrange(3, n_vocab) for _ in range(n)]
    for first, count in ((0, n), (n, 1)):
        for i in range(count):
            batch.token[i] = tokens[first + i]
            batch.pos[i] = first + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = count
        if crash is not None:
            _crash(crash)
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise AgentError(f"llama_decode returned {rc} for a batch of {count} token(s)")
        rows = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(count, n_vocab))
        if not np.isfinite(rows).all():
            bad = int(np.count_nonzero(~np.isfinite(rows).all(axis=1)))
            raise AgentError(f"{bad} of {count} logits rows are not finite (batch of {count})")
        if not (np.ptp(rows, axis=1) > 0).all():
            raise AgentError(f"constant logits rows (batch of {count})")


def child_main(type_name: str, base: Path, out: Path, threads: int, batch_sizes: Sequence[int]) -> int:
    """Quantize (unless cached), then decode every batch size with both kernel sets (module docstring)."""
    import resource

    spec = _BY_NAME[type_name]
    crash = _test_crash(type_name)
    # A crash here is a result: no core dump of it (the parent names the signal).
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    _emit(event="stage", stage="import llama_cpp")
    import llama_cpp as lib

    _emit(event="system_info", text=lib.llama_print_system_info().decode("utf-8", "replace"))
    logs = _LogCapture(lib)
    lib.llama_backend_init()
    try:
        if not out.is_file():
            _emit(event="stage", stage="quantize")
            _quantize(lib, spec, base, out, threads)
        _check_types(out, spec.name)
        for kernels, repack in (("plain", False), ("repacked", True)):
            rng = random.Random(SEED)  # noqa: S311 (test tokens; the same for both kernel sets)
            _emit(event="stage", stage=f"{kernels} kernels, load")
            mparams = lib.llama_model_default_params()
            mparams.use_extra_bufts = repack
            logs.take_buffers()
            model = lib.llama_model_load_from_file(str(out).encode(), mparams)
            if not model:
                raise AgentError(f"llama.cpp could not load the {spec.name} test model")
            _emit(event="buffers", kernels=kernels, buffers=list(logs.take_buffers()))
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = N_CTX
            cparams.n_batch = N_BATCH
            cparams.n_ubatch = N_BATCH
            cparams.n_seq_max = 1
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            cparams.no_perf = True
            ctx = lib.llama_init_from_model(model, cparams)
            if not ctx:
                lib.llama_model_free(model)
                raise AgentError(f"llama.cpp could not create a context for the {spec.name} test model")
            batch = lib.llama_batch_init(N_BATCH, 0, 1)
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
            try:
                for n in batch_sizes:
                    _emit(event="stage", stage=f"{kernels} kernels, batch {n}")
                    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                    _decode_all(lib, ctx, batch, n_vocab, n, rng, crash)
            finally:
                lib.llama_batch_free(batch)
                lib.llama_free(ctx)
                lib.llama_model_free(model)
    except AgentError as exc:
        _emit(event="error", message=str(exc))
        return 3
    _emit(event="done")
    return 0


def _child_cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.engine.doctor", description="one doctor child")
    p.add_argument("--child", required=True, choices=TYPE_NAMES)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default=",".join(map(str, BATCH_SIZES)))
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x]
    return child_main(args.child, args.base, args.out, args.threads, batches)


if __name__ == "__main__":
    sys.exit(_child_cli(sys.argv[1:]))


__all__ = [
    "BATCH_SIZES",
    "CACHE_DIR",
    "DOCTOR_FILE",
    "TENSOR_TYPES",
    "TEST_CRASH_ENV",
    "TYPE_NAMES",
    "DoctorReport",
    "TensorType",
    "TypeResult",
    "cache_dir",
    "child_main",
    "current_build",
    "failed_types_for",
    "failure_message",
    "interpret",
    "llama_cpp_version",
    "load_results",
    "parse_types",
    "results_path",
    "run_doctor",
    "run_type",
    "save_results",
    "system_features",
    "write_base_model",
]
