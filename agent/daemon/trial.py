"""The crash-isolation child: load one model with the daemon's settings and exercise it.

``python -m agent.daemon.trial`` reads ``{"info": ModelInfo fields, "settings": Settings}`` (JSON) on
stdin, builds the engine exactly as the daemon does (:func:`agent.engine.factory.build_engine`, without
isolation), loads it, runs the pool's smoke test and, for a generative model, a prompt that fills a
whole batch (the kernels that fault are often the batched ones), then prints one JSON line:
``{"ok": true, "detail": ...}`` or ``{"ok": false, "error": ...}`` (exit status 1). A crash of the
inference library kills this process, which is the point: the parent
(:class:`agent.engine.isolation.ChildTrial`) reads the signal from the exit status.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from agent.engine.base import CompletionRequest, ModelInfo, SamplingParams
from agent.engine.isolation import inject_fault

__all__ = ["main", "trial"]

BATCH_PROMPT_WORDS = 400


def _info(data: dict[str, Any]) -> ModelInfo:
    data = dict(data)
    data["path"] = Path(data["path"])
    if data.get("tokenizer_path") is not None:
        data["tokenizer_path"] = Path(data["tokenizer_path"])
    return ModelInfo(**data)


async def trial(info: ModelInfo, settings_data: dict[str, Any]) -> str:
    """Load, smoke-test and (for a generative model) prefill a batch; return a one-line summary."""
    from agent.config import Settings
    from agent.daemon.catalog import companion_path
    from agent.engine.factory import build_engine
    from agent.engine.pool import smoke_generate

    settings = Settings(**settings_data)
    engine = build_engine(info, settings, companion=partial(companion_path, settings))
    started = time.monotonic()
    try:
        await engine.load()
        loaded = time.monotonic()
        inject_fault("trial", info.id)
        await smoke_generate(engine)
        if info.task != "embedding":
            words = " ".join(f"edge box {i} reports its temperature." for i in range(BATCH_PROMPT_WORDS))
            room = max(16, min(settings.engine.n_batch, settings.engine.n_ctx // 2) - 8)
            tokens = engine.count_tokens(words)
            prompt = words[: max(1, len(words) * room // max(tokens, 1))]
            request = CompletionRequest(
                prompt=prompt,
                max_tokens=2,
                sampling=SamplingParams(temperature=0.0, top_k=1),
                request_id="trial",
            )
            async for _chunk in engine.generate(request):
                pass
        return f"loaded in {loaded - started:.2f} s, smoke test and batch prefill passed"
    finally:
        await engine.close()


def main() -> int:
    try:
        spec = json.loads(sys.stdin.read(1 << 20))
        detail = asyncio.run(trial(_info(spec["info"]), spec["settings"]))
    except Exception as exc:  # a clean failure: reported, not a crash
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}), flush=True)
        return 1
    print(json.dumps({"ok": True, "detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
