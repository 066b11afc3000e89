"""Which engine serves a model: llama.cpp for GGUF, onnxruntime for ONNX (chosen by the file's format).

:func:`build_engine` is the one place that maps settings onto an engine's constructor; the daemon
(:mod:`agent.daemon.app`), the crash-isolation child (:mod:`agent.daemon.trial`) and the benchmarks
build engines through it, so a trial runs exactly what the daemon will. :func:`engine_fingerprint`
is what of the settings shapes how a model runs (crash isolation keys its verdicts by it).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.config import Settings
from agent.engine.base import Engine, ModelInfo
from agent.engine.core_share import CoreShare, Mode, apply_thread_wait
from agent.engine.lifecycle import LoadGuard
from agent.engine.llama import LlamaEngine
from fleet.log import get_logger

log = get_logger(__name__)


@functools.cache
def shared_cores(mode: Mode, embed_threads: int) -> CoreShare:
    """The process's :class:`CoreShare` for these settings: every engine built with them shares it,
    so the models share the cores (docs/engine.md, *Sharing the cores*)."""
    return CoreShare(mode, embed_threads=embed_threads)


def embed_threads_for(settings: Settings, threads: int) -> int:
    """``engine.embed_threads``, else 1 with ``cpu_sharing = "split"`` and ``n_threads`` otherwise."""
    e = settings.engine
    return e.embed_threads or (1 if e.cpu_sharing == "split" else threads)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


Companion = Callable[[ModelInfo, str], Path | None]
"""Finds a model's verified companion file by name (``tokenizer.json``), re-hashed at the call."""


def build_engine(
    info: ModelInfo, settings: Settings, guard: LoadGuard | None = None, companion: Companion | None = None
) -> Engine:
    """The engine for a model, chosen by its format: llama.cpp for GGUF, onnxruntime for ONNX.
    With ``guard`` (crash isolation), the model is tried in a child process before it loads here;
    ``companion`` finds a store model's signed tokenizer (the daemon's catalog)."""
    threads = settings.engine.n_threads or default_threads()
    embed_threads = embed_threads_for(settings, threads)
    if "llama_cpp" not in sys.modules:  # libgomp reads its wait policy when llama.cpp loads
        apply_thread_wait(settings.engine.thread_wait, os.environ)
    elif settings.engine.thread_wait == "passive" and os.environ.get("OMP_WAIT_POLICY") is None:
        log.warning("thread_wait_not_applied", reason="llama.cpp was loaded before; restart to apply")
    share = shared_cores(settings.engine.cpu_sharing, embed_threads)
    if info.format == "onnx":
        from agent.engine.onnx import OnnxEmbeddingEngine

        emb = settings.embedding
        return OnnxEmbeddingEngine(
            info,
            tokenizer_path=emb.tokenizer
            if emb.path == info.path
            else (companion(info, "tokenizer.json") if companion is not None else None),
            n_threads=embed_threads,
            max_length=emb.max_length,
            batch_size=emb.batch_size,
            max_queue=emb.max_queue,
            max_wait_s=emb.max_wait_s,
            share=share,
            guard=guard,
        )
    e = settings.engine
    return LlamaEngine(
        info,
        n_ctx=e.n_ctx,
        n_threads=threads,
        n_batch=e.n_batch,
        max_queue=e.max_queue,
        n_parallel=e.n_parallel,
        prefill_chunk=e.prefill_chunk,
        batch_invariant=e.batch_invariant,
        kv_unified=e.kv_unified,
        kv_cache_type_k=e.kv_cache_type_k,
        kv_cache_type_v=e.kv_cache_type_v,
        embed_threads=embed_threads,
        embed_max_queue=settings.embedding.max_queue,
        embed_max_wait_s=settings.embedding.max_wait_s,
        share=share,
        guard=guard,
        prompt_cache_dir=settings.state_dir / "prompt-cache" if e.prompt_cache else None,
        prompt_cache_max_mb=e.prompt_cache_max_mb,
        prompt_cache_min_tokens=e.prompt_cache_min_tokens,
    )


def engine_fingerprint(info: ModelInfo, settings: Settings) -> str:
    """What in the settings shapes how ``info`` runs (a new trial when it changes)."""
    import json

    if info.format == "onnx":
        from importlib import metadata

        section: dict[str, Any] = settings.embedding.model_dump(mode="json", exclude={"path", "id"})
        section["onnxruntime"] = metadata.version("onnxruntime")
    else:
        section = settings.engine.model_dump(mode="json")
    section["n_threads"] = settings.engine.n_threads or default_threads()
    section["task"] = info.task
    return json.dumps(section, sort_keys=True)


__all__ = [
    "Companion",
    "embed_threads_for",
    "shared_cores",
    "build_engine",
    "default_threads",
    "engine_fingerprint",
]
