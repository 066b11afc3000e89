"""Which engine serves a model: llama.cpp for GGUF, onnxruntime for ONNX (chosen by the file's format).

:func:`build_engine` is the one place that maps settings onto an engine's constructor; the daemon
(:mod:`agent.daemon.app`), the crash-isolation child (:mod:`agent.daemon.trial`) and the benchmarks
build engines through it, so a trial runs exactly what the daemon will. :func:`engine_fingerprint`
is what of the settings shapes how a model runs (crash isolation keys its verdicts by it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.config import Settings
from agent.engine.base import Engine, ModelInfo
from agent.engine.lifecycle import LoadGuard
from agent.engine.llama import LlamaEngine


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
    if info.format == "onnx":
        from agent.engine.onnx import OnnxEmbeddingEngine

        emb = settings.embedding
        return OnnxEmbeddingEngine(
            info,
            tokenizer_path=emb.tokenizer
            if emb.path == info.path
            else (companion(info, "tokenizer.json") if companion is not None else None),
            n_threads=threads,
            max_length=emb.max_length,
            batch_size=emb.batch_size,
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


__all__ = ["Companion", "build_engine", "default_threads", "engine_fingerprint"]
