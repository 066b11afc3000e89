"""Which model files this daemon may serve.

Either one explicitly configured file (``[model] path``: development and tests), or the models
installed in the signed store under ``<state_dir>/registry`` (``edge-agent demo`` builds one;
``edge-agent registry import`` fills it), each re-hashed before it is handed out
(:mod:`agent.store_catalog`).
"""

from __future__ import annotations

from pathlib import Path

from agent.config import Settings
from agent.engine.base import ModelInfo


def info_for_file(path: Path, model_id: str | None = None, chat_template: str | None = None) -> ModelInfo:
    st = path.stat()
    onnx = path.suffix == ".onnx"
    return ModelInfo(
        id=model_id or path.name.removesuffix(".gguf").removesuffix(".onnx"),
        path=path,
        format="onnx" if onnx else "gguf",
        task="embedding" if onnx else "completion",
        size_bytes=st.st_size,
        created=int(st.st_mtime),
        chat_template=chat_template,
    )


def discover(settings: Settings) -> list[ModelInfo]:
    """Models to serve, the default first. Missing or refused files are skipped, never fatal."""
    if settings.model.path is not None:
        path = settings.model.path
        if not path.is_file():
            return []
        return [info_for_file(path, settings.model.id, settings.model.chat_template)]
    from agent.store_catalog import discover_store

    return discover_store(settings)


__all__ = ["discover", "info_for_file"]
