"""Which model files this daemon may serve.

Until a model store is enrolled, the agent serves either an explicitly configured file
(``[model] path``) or the GGUF files placed in ``<state_dir>/models`` by ``edge-agent demo``.
The id of a file is its name without the ``.gguf`` suffix.
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
    """Models to serve, the default first. Missing files are skipped, never fatal."""
    if settings.model.path is not None:
        path = settings.model.path
        if not path.is_file():
            return []
        return [info_for_file(path, settings.model.id, settings.model.chat_template)]
    directory = settings.models_dir
    if not directory.is_dir():
        return []
    return [info_for_file(p) for p in sorted(directory.glob("*.gguf")) if p.is_file()]


__all__ = ["discover", "info_for_file"]
