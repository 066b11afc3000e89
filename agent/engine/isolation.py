"""Crash isolation: a model file is tried in a child process before this daemon loads it.

A model that kills the process (an illegal instruction in a kernel built for another CPU, a
segmentation fault on a malformed tensor, the OOM killer) must not take the daemon down, nor bring
it down again at every restart. So:

1. **Trial.** The first time a model file is served with given engine settings by a given
   llama.cpp build, a child process loads it with the same settings and runs the smoke test (and a
   prompt of a full batch). A child that dies by a signal or outlives ``timeout_s`` *refuses* the
   model: :meth:`Isolation.admit` raises :class:`agent.errors.ModelRefused` with the reason
   (``SIGILL``, ``SIGSEGV``, ``SIGBUS``, ``SIGABRT``, ``SIGKILL`` (the OOM killer), ``timeout``). A
   child that fails cleanly (a load error) is not remembered: the daemon's own load fails the same
   way, contained.
2. **Verdicts** are remembered per key = sha256(file sha256, settings fingerprint, build id) in
   ``<dir>/verdicts.json`` (written atomically), so the trial runs once per (file, settings, build)
   and a refused model is refused at once, across restarts, until the file, the settings or the
   build change (or the operator deletes the verdict: ``edge-agent registry retry``).
3. **Crash-loop guard.** Around the daemon's own load a marker ``<dir>/activating/<key>.json`` is
   written (fsynced) and removed when the load returns. A marker found at start (:meth:`recover`)
   means the daemon died while activating that model: it becomes a refused verdict
   (``daemon_died``) and the model is skipped instead of loaded again.

Invariants:
- a key never maps to both verdicts; a refused verdict is never turned into ``ok`` except by a
  new trial after the operator forgot it;
- the verdict file is replaced whole (temp file, fsync, rename): a crash leaves the old or the
  new version, never a torn one; an unreadable file is treated as empty (every model is tried again);
- markers exist only while a load is running in this process, or after this process died in one.

The child is :mod:`agent.daemon.trial`; :class:`ChildTrial` runs it. Tests and benchmarks may inject a
fault with ``EDGE_AGENT_TEST_FAULT`` (:func:`inject_fault`); nothing else reads that variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.engine.base import ModelInfo
from agent.errors import ModelLoadError, ModelRefused
from fleet.log import get_logger

log = get_logger(__name__)

__all__ = [
    "ChildTrial",
    "FAULT_ENV",
    "Isolation",
    "TrialOutcome",
    "TrialRunner",
    "Verdict",
    "current_build",
    "file_sha256",
    "inject_fault",
    "signal_reason",
]

FAULT_ENV = "EDGE_AGENT_TEST_FAULT"
"""``STAGE:MODEL_ID:ACTION`` (test-only): STAGE ``trial`` (the child) or ``activate`` (the daemon's
own load, inside its marker); ACTION ``abort``, ``sigill``, ``sigsegv``, ``sigbus`` or ``hang``."""
MAX_VERDICTS_BYTES = 4 << 20
MAX_CHILD_OUTPUT = 64 << 10


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a trial (or a death during activation) decided about one (file, settings, build)."""

    key: str
    model: str
    path: str
    sha256: str
    status: str
    """``ok`` or ``refused``."""
    reason: str
    """``ok``; else ``SIGILL`` ..., ``timeout`` or ``daemon_died``."""
    detail: str
    at: float
    build: str

    @property
    def refused(self) -> bool:
        return self.status == "refused"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrialOutcome:
    """How a child trial ended: ``crashed`` (signal or timeout) or not, ``ok`` or not, and why."""

    ok: bool
    reason: str
    detail: str
    crashed: bool = False


class TrialRunner(Protocol):
    """Runs one trial of ``info`` and says how it ended (never raises for the child's failures)."""

    async def __call__(self, info: ModelInfo, timeout_s: float) -> TrialOutcome: ...


def signal_reason(returncode: int) -> str:
    """``SIGILL`` for a child killed by signal 4 (``returncode`` -4), ``exit N`` otherwise."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


_SIGNAL_HINTS = {
    "SIGILL": "an instruction this CPU does not execute (see `edge-agent doctor`)",
    "SIGKILL": "killed, most likely by the out-of-memory killer",
    "SIGSEGV": "a memory fault in the inference library",
    "SIGBUS": "a bus error (a truncated or unreadable file mapping?)",
    "SIGABRT": "the inference library aborted (an assertion failed)",
}


def file_sha256(path: Path) -> str:
    """The sha256 of a model file: its name for a content-addressed store blob, else hashed."""
    name = path.name
    if path.parent.name == "sha256" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def current_build() -> str:
    """The inference build a verdict holds for (:func:`agent.hardware.build_profile.installed_build`)."""
    from agent.hardware.build_profile import installed_build

    return installed_build()[0]


def inject_fault(stage: str, model_id: str, environ: Mapping[str, str] = os.environ) -> None:
    """Test-only: die or hang here when ``EDGE_AGENT_TEST_FAULT`` names this stage and model."""
    spec = environ.get(FAULT_ENV, "")
    if not spec:
        return
    want_stage, _, rest = spec.partition(":")
    want_model, _, action = rest.rpartition(":")
    if want_stage != stage or want_model != model_id:
        return
    log.warning("test_fault_injected", stage=stage, model=model_id, action=action)
    if action == "abort":
        os.abort()
    if action == "hang":
        while True:
            time.sleep(3600)
    signum = {"sigill": signal.SIGILL, "sigsegv": signal.SIGSEGV, "sigbus": signal.SIGBUS}.get(action)
    if signum is None:
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} (abort, sigill, sigsegv, sigbus, hang)")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the signal is delivered before this returns


class Isolation:
    """Trials, verdicts and activation markers of one daemon (module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        build: str,
        fingerprint: Callable[[ModelInfo], str],
        runner: TrialRunner | None,
        timeout_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.build = build
        self._fingerprint = fingerprint
        self._runner = runner
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int, int], str] = {}
        self._trials: dict[str, asyncio.Future[None]] = {}
        self._listeners: list[Callable[[Verdict], None]] = []

    # -- keys -----------------------------------------------------------------------------------

    def sha_of(self, info: ModelInfo) -> str:
        """The model file's sha256 (cached per path, size, mtime and inode)."""
        st = info.path.stat()
        cache_key = (str(info.path), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = self._hashes.get(cache_key)
        if sha is None:
            sha = self._hashes[cache_key] = file_sha256(info.path)
        return sha

    def key_of(self, info: ModelInfo) -> str:
        parts = json.dumps([self.sha_of(info), self._fingerprint(info), self.build])
        return hashlib.sha256(parts.encode()).hexdigest()

    # -- verdicts -------------------------------------------------------------------------------

    @property
    def _verdicts_path(self) -> Path:
        return self.directory / "verdicts.json"

    @property
    def _markers(self) -> Path:
        return self.directory / "activating"

    def verdicts(self) -> dict[str, Verdict]:
        """Every remembered verdict by key (an unreadable file reads as none)."""
        try:
            with self._verdicts_path.open("rb") as fh:
                raw = fh.read(MAX_VERDICTS_BYTES + 1)
            data = json.loads(raw) if len(raw) <= MAX_VERDICTS_BYTES else {}
            return {k: Verdict(**v) for k, v in data.items()} if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("isolation_verdicts_unreadable", path=str(self._verdicts_path), error=str(exc))
            return {}

    def refused(self) -> list[Verdict]:
        """The refused verdicts of this build, newest first (``status``, ``registry list``)."""
        found = [v for v in self.verdicts().values() if v.refused and v.build == self.build]
        return sorted(found, key=lambda v: v.at, reverse=True)

    def verdict_for(self, info: ModelInfo) -> Verdict | None:
        try:
            key = self.key_of(info)
        except OSError:
            return None
        return self.verdicts().get(key)

    def forget(self, model: str | None = None) -> int:
        """Forget the refused verdicts (of ``model``, or all): their models are tried again."""
        with self._lock:
            verdicts = self.verdicts()
            keep = {k: v for k, v in verdicts.items() if not (v.refused and model in (None, v.model))}
            self._write(keep)
        return len(verdicts) - len(keep)

    def _record(self, verdict: Verdict) -> None:
        with self._lock:
            verdicts = self.verdicts()
            verdicts[verdict.key] = verdict
            self._write(verdicts)
        if verdict.refused:
            log.error(
                "model_refused",
                model=verdict.model,
                reason=verdict.reason,
                detail=verdict.detail,
                path=verdict.path,
            )
            for listener in list(self._listeners):
                try:
                    listener(verdict)
                except Exception:  # a listener (audit, hub event) must not break the load path
                    log.exception("isolation_listener_failed", model=verdict.model)

    def _write(self, verdicts: dict[str, Verdict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._verdicts_path.with_suffix(f".tmp.{os.getpid()}")
        data = json.dumps({k: v.to_dict() for k, v in verdicts.items()}, indent=1, sort_keys=True)
        with tmp.open("w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._verdicts_path)
        _fsync_dir(self.directory)

    def add_listener(self, listener: Callable[[Verdict], None]) -> None:
        """Called (on the loop or a loader thread) with every new refused verdict."""
        self._listeners.append(listener)

    def _verdict(self, info: ModelInfo, key: str, sha: str, status: str, reason: str, detail: str) -> Verdict:
        return Verdict(key, info.id, str(info.path), sha, status, reason, detail, self._clock(), self.build)

    # -- the trial ------------------------------------------------------------------------------

    async def admit(self, info: ModelInfo) -> None:
        """Return when ``info`` may be loaded in this process; raise :class:`ModelRefused` when its
        trial crashed now or before, :class:`ModelLoadError` when the trial failed cleanly."""
        try:
            sha = await asyncio.to_thread(self.sha_of, info)
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {info.path}: {exc.strerror or exc}") from None
        key = self.key_of(info)
        known = self.verdicts().get(key)
        if known is not None:
            if known.refused:
                raise _refusal(known)
            return
        if self._runner is None:
            return
        running = self._trials.get(key)
        if running is not None:  # the same file and settings under two ids: one trial
            await asyncio.shield(running)
            return await self.admit(info)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._trials[key] = future
        try:
            log.info("model_trial", model=info.id, path=str(info.path), timeout_s=self.timeout_s)
            started = time.monotonic()
            outcome = await self._runner(info, self.timeout_s)
            log.info(
                "model_trial_done",
                model=info.id,
                ok=outcome.ok,
                reason=outcome.reason,
                seconds=round(time.monotonic() - started, 2),
            )
            if outcome.crashed:
                verdict = self._verdict(info, key, sha, "refused", outcome.reason, outcome.detail)
                await asyncio.to_thread(self._record, verdict)
                raise _refusal(verdict)
            if not outcome.ok:
                raise ModelLoadError(f"model {info.id!r} failed its trial: {outcome.detail}")
            await asyncio.to_thread(self._record, self._verdict(info, key, sha, "ok", "ok", outcome.detail))
        finally:
            del self._trials[key]
            future.set_result(None)

    # -- the crash-loop guard -------------------------------------------------------------------

    @contextlib.contextmanager
    def activating(self, info: ModelInfo) -> Iterator[None]:
        """Hold a marker while this process loads ``info`` (module docstring, 3)."""
        key = self.key_of(info)
        marker = self._markers / f"{key}.json"
        self._markers.mkdir(parents=True, exist_ok=True)
        body = {"model": info.id, "path": str(info.path), "sha256": self.sha_of(info), "pid": os.getpid()}
        body["at"] = self._clock()
        with marker.open("w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self._markers)
        try:
            inject_fault("activate", info.id)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()

    def recover(self) -> list[Verdict]:
        """At start: each marker left by a daemon that died while loading becomes a refused verdict."""
        found: list[Verdict] = []
        try:
            markers = sorted(self._markers.glob("*.json"))
        except OSError:
            return found
        for marker in markers:
            try:
                body = json.loads(marker.read_text())
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(body["at"])))
                detail = (
                    f"the daemon (pid {body['pid']}) died while activating this model at {when}; "
                    "it is skipped until its file, the engine settings or the build change "
                    "(or `edge-agent registry retry`)"
                )
                verdict = Verdict(
                    marker.stem,
                    str(body["model"]),
                    str(body["path"]),
                    str(body["sha256"]),
                    "refused",
                    "daemon_died",
                    detail,
                    self._clock(),
                    self.build,
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("isolation_marker_unreadable", path=str(marker), error=str(exc))
            else:
                self._record(verdict)
                found.append(verdict)
            with contextlib.suppress(OSError):
                marker.unlink()
        return found


def _refusal(verdict: Verdict) -> ModelRefused:
    hint = _SIGNAL_HINTS.get(verdict.reason)
    why = f"{verdict.reason} ({hint})" if hint else verdict.reason
    return ModelRefused(
        f"model {verdict.model!r} refused by crash isolation: {why}: {verdict.detail}", reason=verdict.reason
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ChildTrial:
    """Runs :mod:`agent.daemon.trial` in a child process: the spec (model info and settings, JSON) on its
    stdin, a one-line JSON result on its stdout, its stderr kept (bounded) for the detail."""

    def __init__(self, settings_json: Callable[[], dict[str, Any]], python: str = sys.executable) -> None:
        self._settings_json = settings_json
        self._python = python

    async def __call__(self, info: ModelInfo, timeout_s: float) -> TrialOutcome:
        spec = {
            "info": {**asdict(info), "path": str(info.path), "tokenizer_path": _opt(info.tokenizer_path)},
            "settings": self._settings_json(),
        }
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "agent.daemon.trial",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return TrialOutcome(False, "timeout", f"its trial took longer than {timeout_s:g} s", crashed=True)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        code = proc.returncode if proc.returncode is not None else -1
        tail = err[-MAX_CHILD_OUTPUT:].decode("utf-8", "replace").strip().splitlines()[-3:]
        if code < 0:
            reason = signal_reason(code)
            detail = f"the trial process died by {reason} (exit status {code})"
            return TrialOutcome(False, reason, detail, crashed=True)
        try:
            result = json.loads(out[-MAX_CHILD_OUTPUT:].decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {}
        if code == 0 and result.get("ok") is True:
            return TrialOutcome(True, "ok", str(result.get("detail", "")))
        detail = str(result.get("error") or " | ".join(tail) or f"exit status {code}")
        return TrialOutcome(False, "failed", detail[:1000])


def _opt(path: Path | None) -> str | None:
    return None if path is None else str(path)
