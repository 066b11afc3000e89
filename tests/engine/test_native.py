"""The llama.cpp adapter with the real model: the greedy fast path equals llama.cpp's own chain."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engine.base import SamplingParams
from agent.engine.native import NativeContext, NativeModel

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def decoded(gemma_path: Path) -> Iterator[tuple[Any, NativeModel, NativeContext, int]]:
    import llama_cpp

    model = NativeModel(gemma_path, repack=False)
    ctx = NativeContext(model, n_ctx=256, n_batch=64, n_slots=1, n_threads=2)
    tokens = model.tokenize("The capital of France is", add_bos=True)
    assert ctx.decode(tokens, list(range(len(tokens))), [0] * len(tokens), [True] * len(tokens)) == 0
    yield llama_cpp, model, ctx, len(tokens) - 1
    ctx.close()
    model.close()


def native_greedy(lib: Any, model: NativeModel, ctx: NativeContext, row: int, bias: dict[int, float]) -> int:
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if bias:
        arr = (lib.llama_logit_bias * len(bias))()
        for i, (t, b) in enumerate(bias.items()):
            arr[i].token, arr[i].bias = t, b
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(model.n_vocab, len(bias), arr))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    try:
        return int(lib.llama_sampler_sample(chain, ctx._ctx, row))
    finally:
        lib.llama_sampler_free(chain)


@pytest.mark.parametrize(
    "make_bias",
    [
        pytest.param(lambda top: {}, id="no-bias"),
        pytest.param(lambda top: {top: -100.0}, id="ban-the-top-token"),
        pytest.param(lambda top: {top: -1.5, 1: -100.0, 106: -100.0}, id="several"),
        pytest.param(lambda top: {7: 100.0}, id="promote-another"),
    ],
)
def test_greedy_fast_path_equals_the_native_chain(decoded: Any, make_bias: Any) -> None:
    lib, model, ctx, row = decoded
    top = native_greedy(lib, model, ctx, row, {})
    bias = make_bias(top)
    fast = ctx.make_sampler(SamplingParams(temperature=0.0, logit_bias=bias), []).sample(row)
    assert fast == native_greedy(lib, model, ctx, row, bias)


def test_metadata_and_pieces(decoded: Any) -> None:
    _, model, _, _ = decoded
    assert model.meta("general.architecture") == "gemma3"
    assert model.meta("no.such.key") is None
    assert model.chat_template() is None  # Gemma 3 270M is a base model
    assert model.token_text(model.bos_id) == "<bos>"
    assert model.piece(model.bos_id) == b""  # control tokens render as no text
    assert model.is_eog(model.eos_id)
