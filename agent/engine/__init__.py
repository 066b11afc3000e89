"""Inference backends behind one protocol (:mod:`agent.engine.base`).

Heavy libraries (llama_cpp, onnxruntime) are imported only inside the backend that needs them,
so that importing this package stays cheap.
"""

from agent.engine.base import (
    CompletionRequest,
    Engine,
    EngineState,
    FinishReason,
    GenerationChunk,
    ModelInfo,
    SamplingParams,
    Usage,
)

__all__ = [
    "CompletionRequest",
    "Engine",
    "EngineState",
    "FinishReason",
    "GenerationChunk",
    "ModelInfo",
    "SamplingParams",
    "Usage",
]
