"""The one adapter over llama-cpp-python's low-level C API (``llama_cpp.llama_*``).

Everything that touches a ``llama_model``, ``llama_context``, ``llama_batch`` or ``llama_sampler``
pointer lives here; the batching logic above it (:mod:`agent.engine.batching`) sees plain ints and
bytes through :class:`DecodeBackend` methods.

Invariants:

* A :class:`NativeContext` is used by exactly one thread (the decode thread) after construction;
  a :class:`NativeModel` is shared read-only (tokenize, pieces, metadata are thread-safe in
  llama.cpp).
* By default every sequence slot has its own KV stream (``kv_unified = false``): a sequence's
  attention then never spans other sequences' cells, which with llama.cpp's CPU kernels changes
  its numerics (measured: greedy outputs diverged when another request joined); ``unified``
  shares the cells instead. For sliding-window models the cache is full-size (``swa_full``), so
  that a sequence can be truncated to any common prefix with ``llama_memory_seq_rm``
  (llama-cpp-python 0.3.36 binds the ``llama_memory_*`` API; the older ``llama_kv_self_*`` names
  are used when it is absent).
* A model loaded with ``repack=False`` selects the batch-invariant kernel set, in which a row's
  logits do not depend on how many other rows share its batch: no repacked weights
  (``use_extra_bufts = false``); no flash attention in its contexts (ggml's CPU flash attention
  takes a split-KV path for a lone one-token query over >= 512 cells, and the plain one when two
  streams share the batch, with different rounding); and, for a context of
  ``TILED_MIN_ROWS`` (8) slots or more, whose generation batches can reach 8 rows, no tiled K-quant
  matmul (``GGML_CPU_TILED_MM=0``: ggml takes it for >= 8 rows on x86 with AVX, AVX2 or
  AVX512-VNNI, while one row takes the plain dot product). That switch is an environment variable
  ggml reads once per process, at its first matrix product: it is set before the context exists.
* Every C object created here is freed exactly once by ``close()``.
* llama.cpp's own logging is routed into our structlog logger (errors only), never to stdout.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.engine import kv_pages
from agent.engine.base import SamplingParams
from agent.errors import BadRequest, EngineError, ModelLoadError
from fleet.log import get_logger

log = get_logger(__name__)

__all__ = [
    "GREEDY_PENALTY_TOP_K",
    "INVARIANT_KERNEL_ENV",
    "KV_GGML_TYPES",
    "PENALTY_LAST_N",
    "NativeContext",
    "NativeModel",
    "NativeSampler",
    "TILED_MIN_ROWS",
    "silence_llama_logs",
    "use_invariant_kernels",
]

PENALTY_LAST_N = 64
"""Tokens of history the repeat/frequency/presence penalties look at (llama.cpp's default)."""
GREEDY_PENALTY_TOP_K = 64
"""Candidates kept before the penalties when sampling greedily with penalties."""
GRAMMAR_TOP_N = 1024
"""A token the grammar rejects is re-drawn among the grammar-allowed ones of the most likely
``GRAMMAR_TOP_N`` (the whole vocabulary when none of those is allowed). With ``top_k`` at most
that, the draw is the one llama.cpp's full-vocabulary pass gives whenever ``top_k`` allowed tokens
are among them; tokens further down have next to no probability anyway."""
GRAMMAR_CACHE = 64
"""Compiled grammars kept per model (each sequence gets a clone: a grammar sampler has state)."""

INVARIANT_KERNEL_ENV = {"GGML_CPU_TILED_MM": "0"}
"""Process-wide ggml switches of the batch-invariant kernel set (read once, at the first matmul)."""
TILED_MIN_ROWS = 8
"""Rows from which ggml's tiled K-quant matmul replaces the plain dot product (``ggml_tiled_min_batch``)."""

KV_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
"""KV cache element types by name -> ``enum ggml_type`` values (ggml.h; stable across versions,
and llama-cpp-python 0.3.36 does not export ``GGML_TYPE_BF16``)."""
QUANTIZED_KV = frozenset({"q4_0", "q8_0"})
"""Block-quantized KV types; as V they need flash attention (llama.cpp refuses the context without)."""

_GGML_LOG_ERROR = 4
_LLAMA_FLASH_ATTN_DISABLED = 0
_LLAMA_FLASH_ATTN_ENABLED = 1
_log_lock = threading.Lock()
_log_state: dict[str, Any] = {}
_create_lock = threading.Lock()
"""Serialises context creation with the release of its KV pages (:mod:`agent.engine.kv_pages`)."""
_capture = threading.local()
"""``lines``: a list collecting llama.cpp's log lines on this thread while set (context creation)."""
_kernel_state: dict[str, bool] = {}


def _lib() -> Any:
    import llama_cpp  # heavy import: only inside the adapter

    return llama_cpp


def silence_llama_logs() -> None:
    """Route llama.cpp's log output to structlog (errors only). Idempotent."""
    lib = _lib()
    with _log_lock:
        if "callback" not in _log_state:

            def forward(level: int, text: bytes, _user: Any) -> None:
                lines = getattr(_capture, "lines", None)
                if lines is not None and text:
                    lines.append(text.decode("utf-8", "replace"))
                if level == _GGML_LOG_ERROR and text:
                    log.error("llama_cpp", message=text.decode("utf-8", "replace").rstrip())

            _log_state["callback"] = lib.llama_log_callback(forward)  # kept alive for the C side
            lib.llama_backend_init()
        lib.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


def use_invariant_kernels() -> bool:
    """Turn ggml's tiled K-quant matmul off for this process (idempotent).

    Sets :data:`INVARIANT_KERNEL_ENV`. ggml reads it once per process, at its first matrix
    product; returns False (and logs it once) when a context was created in this process before
    without the switch, since then it may come too late.
    """
    with _log_lock:
        os.environ.update(INVARIANT_KERNEL_ENV)
        late = _kernel_state.get("context_without_switch", False)
        if late and not _kernel_state.get("warned", False):
            _kernel_state["warned"] = True
            log.warning("invariant_kernels_late", env=INVARIANT_KERNEL_ENV)
        return not late


class NativeModel:
    """A loaded GGUF model: vocabulary, metadata, tokenizer. Shared by contexts.

    ``repack=False`` is the batch-invariant kernel set (module docstring): plain weights here,
    and contexts without flash attention (and without tiled matmul from 8 slots on).
    """

    def __init__(self, path: Path, *, repack: bool = True) -> None:
        lib = _lib()
        silence_llama_logs()
        self._lib = lib
        self.batch_invariant: bool = not repack
        """Plain kernels: a row's logits do not depend on the other rows of its batch."""
        params = lib.llama_model_default_params()
        params.use_extra_bufts = repack
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)
        self._piece_lock = threading.Lock()
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(model)
        self.n_embd: int = lib.llama_model_n_embd(model)
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos_id: int = lib.llama_vocab_bos(self._vocab)
        self.eos_id: int = lib.llama_vocab_eos(self._vocab)
        self.has_encoder: bool = bool(lib.llama_model_has_encoder(model))
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._grammar_lock = threading.Lock()

    @property
    def ptr(self) -> Any:
        return self._model

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or ``None`` when the key is absent."""
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = self._lib.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            arr = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos, special)
            if n >= 0:
                return list(arr[:n])
            cap = -n

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (cached). Control tokens render empty unless ``special``."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        with self._piece_lock:
            n = self._lib.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, big, -n, 0, special)
                out = big.raw[:n]
            else:
                out = self._buf.raw[:n]
        self._pieces[key] = out
        return out

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def check_grammar(self, gbnf: str) -> None:
        """Compile ``gbnf`` (cached): :class:`BadRequest` naming ``grammar`` if llama.cpp cannot."""
        self._lib.llama_sampler_free(self.grammar_sampler(gbnf))

    def grammar_sampler(self, gbnf: str) -> Any:
        """A fresh grammar sampler for ``gbnf`` (a clone of the compiled one, cached per grammar);
        :class:`BadRequest` naming ``grammar`` when llama.cpp cannot parse it. Any thread."""
        with self._grammar_lock:
            pristine = self._grammars.get(gbnf)
            if pristine is None:
                pristine = self._lib.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
                if not pristine:
                    raise BadRequest(
                        "grammar: llama.cpp could not parse the GBNF grammar (its root rule must be "
                        "named root; see llama.cpp's grammars/README.md)",
                        param="grammar",
                    )
                self._grammars[gbnf] = pristine
                while len(self._grammars) > GRAMMAR_CACHE:
                    _, old = self._grammars.popitem(last=False)
                    self._lib.llama_sampler_free(old)
            else:
                self._grammars.move_to_end(gbnf)
            return self._lib.llama_sampler_clone(pristine)

    def close(self) -> None:
        with self._grammar_lock:
            for pristine in self._grammars.values():
                self._lib.llama_sampler_free(pristine)
            self._grammars.clear()
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None


class NativeSampler:
    """llama.cpp's native sampler chain for one sequence (see :func:`NativeContext.make_sampler`).

    ``chain is None`` means greedy without penalties: the argmax of the logits row plus the
    logit bias, which is what llama.cpp's ``logit_bias`` + ``greedy`` chain returns (biases are
    added to the logits, the first maximum wins), without building its 262k-entry candidate
    array for every token.

    With a ``grammar`` sampler the token is drawn as llama.cpp's own ``common_sampler`` does:
    first without the grammar; if the grammar rejects that one token, again with the grammar
    applied first (over the ``GRAMMAR_TOP_N`` most likely tokens, else the whole vocabulary).
    Invariant: only a token the grammar allows is accepted into it (llama.cpp aborts the process
    otherwise); when no token is allowed the model's end-of-generation token is returned.
    """

    def __init__(
        self,
        lib: Any,
        chain: Any,
        ctx: Any,
        n_vocab: int,
        bias: dict[int, float] | None = None,
        grammar: Any = None,
        eos: int = -1,
    ) -> None:
        self._lib = lib
        self._chain = chain
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._bias_ids: Any = None
        self._bias_values: Any = None
        self._grammar = grammar
        self._eos = eos
        self._bias: tuple[Any, Any] | None = None
        """(ids, values) of the logit bias, whichever way the chain applies it (for logprobs)."""
        self._cur: Any = None
        self._one: Any = None
        if bias:
            import numpy as np

            self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64)
            self._bias_values = np.fromiter(bias.values(), dtype=np.float32)
            self._bias = (self._bias_ids, self._bias_values)

    def _logits(self, batch_index: int) -> Any:
        import numpy as np

        row = self._lib.llama_get_logits_ith(self._ctx, batch_index)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,))

    def sample(self, batch_index: int) -> int:
        """Sample from the logits of ``batch_index`` in the last batch; the token is accepted."""
        if self._grammar is not None:
            return self._sample_constrained(batch_index)
        if self._chain is None:
            logits = self._logits(batch_index)
            if self._bias_ids is not None:
                logits = logits.copy()
                logits[self._bias_ids] += self._bias_values
            return int(logits.argmax())
        return int(self._lib.llama_sampler_sample(self._chain, self._ctx, batch_index))

    def logprobs(self, batch_index: int, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
        """The log probability of ``token`` and the ``top_n`` most likely tokens with theirs, from
        the logits of ``batch_index`` (logit bias included; see :class:`TokenLogprob`)."""
        import numpy as np

        logits = self._logits(batch_index).astype(np.float64)
        if self._bias is not None:
            logits[self._bias[0]] += self._bias[1]
        top = logits.max()
        norm = top + np.log(np.exp(logits - top).sum())
        best: list[tuple[int, float]] = []
        if top_n > 0:
            ids = np.argpartition(-logits, top_n - 1)[:top_n]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [(int(i), float(logits[i] - norm)) for i in ids]
        return float(logits[token] - norm), best

    # -- grammar -------------------------------------------------------------------------------

    def _candidates(self, logits: Any, ids: Any = None) -> Any:
        """A llama_token_data_array of ``logits`` over ``ids`` (default: the whole vocabulary),
        in a reused buffer."""
        import numpy as np

        lib = self._lib
        if self._cur is None:
            dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._buf = np.zeros(self._n_vocab, dtype=dtype)
            self._cur = lib.llama_token_data_array()
        n = self._n_vocab if ids is None else len(ids)
        view = self._buf[:n]
        if ids is None:
            view["id"] = np.arange(self._n_vocab, dtype=np.int32)
            view["logit"] = logits
        else:
            view["id"] = ids
            view["logit"] = logits[ids]
        view["p"] = 0.0
        cur = self._cur
        cur.data = ctypes.cast(self._buf.ctypes.data, ctypes.POINTER(lib.llama_token_data))
        cur.size = n
        cur.selected = -1
        cur.sorted = False
        return cur

    def _allowed(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (nothing is accepted)."""
        lib = self._lib
        if self._one is None:
            self._one_data = (lib.llama_token_data * 1)()
            self._one = lib.llama_token_data_array()
        self._one_data[0].id = token
        self._one_data[0].logit = 1.0
        self._one_data[0].p = 0.0
        one = self._one
        one.data = ctypes.cast(self._one_data, ctypes.POINTER(lib.llama_token_data))
        one.size = 1
        one.selected = -1
        one.sorted = False
        lib.llama_sampler_apply(self._grammar, ctypes.byref(one))
        return bool(self._one_data[0].logit != float("-inf"))

    def _pick(self, logits: Any, ids: Any = None, with_grammar: bool = False) -> int:
        """The token the chain (or greedy) picks among ``ids`` (default: all), the grammar applied
        first if asked; -1 when nothing is left."""
        lib = self._lib
        if self._chain is None and not with_grammar:
            return int(logits.argmax())
        cur = self._candidates(logits, ids)
        if with_grammar:
            lib.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        kept = self._buf[: cur.size]
        if not (kept["logit"] != float("-inf")).any():
            return -1
        if self._chain is None:  # greedy: the first maximum
            return int(kept["id"][int(kept["logit"].argmax())])
        lib.llama_sampler_apply(self._chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            return -1
        return int(cur.data[cur.selected].id)

    def _sample_constrained(self, batch_index: int) -> int:
        logits = self._logits(batch_index)
        if self._chain is None and self._bias_ids is not None:
            logits = logits.copy()
            logits[self._bias_ids] += self._bias_values
        token = self._pick(logits)
        if not self._allowed(token):
            import numpy as np

            # the grammar over the most likely GRAMMAR_TOP_N tokens first (Gemma's vocabulary is
            # 262k tokens: ~0.15 s a step through the grammar), over all of them if none is allowed
            top = np.argpartition(-logits, GRAMMAR_TOP_N - 1)[:GRAMMAR_TOP_N]
            token = self._pick(logits, top, with_grammar=True) if len(logits) > GRAMMAR_TOP_N else -1
            if token < 0:
                token = self._pick(logits, None, with_grammar=True)
            if token < 0 or not self._allowed(token):
                if self._eos < 0:
                    raise EngineError("the grammar allows no token and the model has no end token")
                return self._eos  # nothing allowed: end here rather than break the grammar
        self._lib.llama_sampler_accept(self._grammar, token)
        if self._chain is not None:
            self._lib.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None


class NativeContext:
    """A llama context with ``n_slots`` sequences: one shared (unified) KV cache, or a stream each.

    ``lazy_kv`` (default): the KV buffers llama.cpp zeroes at creation are given back to the kernel
    (:mod:`agent.engine.kv_pages`), so KV memory becomes resident as cells are written: slots that
    never ran a request hold none. ``type_k``/``type_v`` are the cache's element types
    (:data:`KV_GGML_TYPES`); a quantized ``type_v`` needs flash attention (refused when it is off).

    ``flash_attn``: ``None`` follows the model (off for a batch-invariant model, whose invariance
    it would break; llama.cpp's automatic choice otherwise), ``True``/``False`` force it. A
    batch-invariant model's context of ``TILED_MIN_ROWS`` slots or more calls
    :func:`use_invariant_kernels` first. Implements :class:`agent.engine.batching.DecodeBackend`.
    """

    def __init__(
        self,
        model: NativeModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_slots: int,
        n_threads: int,
        embeddings: bool = False,
        pooling: int | None = None,
        unified: bool = True,
        flash_attn: bool | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        lazy_kv: bool = True,
    ) -> None:
        for role, name in (("kv_cache_type_k", type_k), ("kv_cache_type_v", type_v)):
            if name not in KV_GGML_TYPES:
                known = ", ".join(sorted(KV_GGML_TYPES))
                raise ModelLoadError(f"{role} {name!r} is not a KV cache type the engine knows ({known})")
        if type_v in QUANTIZED_KV and (flash_attn is False or (flash_attn is None and model.batch_invariant)):
            raise ModelLoadError(
                f"kv_cache_type_v {type_v!r} needs flash attention, which a batch-invariant model's "
                "contexts run without (engine.batch_invariant = true)"
            )
        lib = _lib()
        self._lib = lib
        self._model = model
        p = lib.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = n_slots
        p.n_threads = n_threads
        p.n_threads_batch = n_threads
        p.kv_unified = unified
        p.swa_full = True
        p.no_perf = True
        p.type_k = KV_GGML_TYPES[type_k]
        p.type_v = KV_GGML_TYPES[type_v]
        if flash_attn is None and model.batch_invariant:
            flash_attn = False
        if flash_attn is None and type_v in QUANTIZED_KV:
            flash_attn = True  # llama.cpp's "auto" may still say no; a quantized V needs it
        if model.batch_invariant and n_slots >= TILED_MIN_ROWS:
            use_invariant_kernels()
        elif os.environ.get("GGML_CPU_TILED_MM") != "0":
            with _log_lock:
                _kernel_state["context_without_switch"] = True
        if flash_attn is not None:
            p.flash_attn_type = _LLAMA_FLASH_ATTN_ENABLED if flash_attn else _LLAMA_FLASH_ATTN_DISABLED
        self.flash_attn: bool | None = flash_attn
        """False: attention as plain matmul + softmax; None: llama.cpp decides (auto)."""
        self.type_k, self.type_v = type_k, type_v
        """KV cache element types (:data:`KV_GGML_TYPES` names)."""
        if embeddings:
            p.embeddings = True
            if pooling is not None:
                p.pooling_type = pooling
        silence_llama_logs()  # our callback, which captures this thread's lines while asked
        with _create_lock:  # contexts created at once would see each other's buffers as new
            before = kv_pages.anon_regions() if lazy_kv else []
            _capture.lines = []
            try:
                ctx = lib.llama_init_from_model(model.ptr, p)
            finally:
                lines: list[str] = _capture.lines
                _capture.lines = None
            kv_regions = kv_pages.release_kv_pages(before, lines) if lazy_kv and ctx else []
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_ctx} tokens "
                f"(KV cache {type_k}/{type_v}, flash attention {flash_attn})"
            )
        self._ctx = ctx
        self._kv_regions = kv_regions
        self.kv_released_bytes: int = sum(hi - lo for lo, hi in self._kv_regions)
        """KV cache bytes given back to the kernel at creation (resident again once written)."""
        log.info("kv_cache_pages", released_mib=round(self.kv_released_bytes / (1 << 20), 1), lazy=lazy_kv)
        self._mem = lib.llama_get_memory(ctx) if hasattr(lib, "llama_get_memory") else None
        self.shared_kv = unified
        """True: the slots share the context's cells; False: each slot has its own stream."""
        total = int(lib.llama_n_ctx(ctx))
        per_seq = getattr(lib, "llama_n_ctx_seq", None)
        self.n_ctx: int = total if unified else int(per_seq(ctx)) if per_seq else total // n_slots
        """Cells one sequence may use (the whole context when unified)."""
        self.n_batch = n_batch
        self.n_slots = n_slots
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._freed = False

    # -- DecodeBackend -------------------------------------------------------------------------

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]
    ) -> int:
        """Decode one batch; returns llama_decode's status (0 ok, 1 no KV slot, other failure)."""
        n = len(tokens)
        if n > self.n_batch:
            raise EngineError(f"batch of {n} tokens exceeds n_batch {self.n_batch}")
        b = self._batch
        tok, pos, nseq, sid, lg = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i in range(n):
            tok[i] = tokens[i]
            pos[i] = positions[i]
            nseq[i] = 1
            sid[i][0] = seqs[i]
            lg[i] = logits[i]
        b.n_tokens = n
        return int(self._lib.llama_decode(self._ctx, b))

    def set_threads(self, n_threads: int) -> None:
        """Threads of the next decodes (``agent.engine.core_share``: fewer while an embedding runs)."""
        self._lib.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def seq_rm(self, seq: int, p0: int) -> bool:
        """Drop positions ``p0..`` of ``seq`` from the KV cache; ``False`` if llama.cpp cannot."""
        if self._mem is not None:
            return bool(self._lib.llama_memory_seq_rm(self._mem, seq, p0, -1))
        return bool(self._lib.llama_kv_self_seq_rm(self._ctx, seq, p0, -1))  # pragma: no cover

    def seq_cp(self, src: int, dst: int, n: int) -> bool:
        """Make ``dst`` hold exactly the first ``n`` cells of ``src`` (``llama_memory_seq_cp``).

        In one (unified) stream the cells are shared, not copied; across streams llama.cpp copies
        the whole stream buffer at the next decode (it only copies full streams), then the cells
        from ``n`` on are removed from ``dst``. False when the bindings lack the call or a step
        fails (the caller then drops ``dst``'s cache)."""
        lib = self._lib
        if self._mem is None or not hasattr(lib, "llama_memory_seq_cp"):  # pragma: no cover
            return False
        if not lib.llama_memory_seq_rm(self._mem, dst, -1, -1):
            return False
        if self.shared_kv:
            lib.llama_memory_seq_cp(self._mem, src, dst, 0, n)
            return True
        lib.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        return bool(lib.llama_memory_seq_rm(self._mem, dst, n, -1))

    def seq_state(self, seq: int) -> bytearray | None:
        """The sequence's cells as llama.cpp serialises them (``llama_state_seq_get_data``),
        written straight into the returned buffer (one copy: this runs on the decode thread)."""
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self._ctx, seq))
        if size <= 0:
            return None
        buf = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(buf)
        n = int(lib.llama_state_seq_get_data(self._ctx, view, size, seq))
        del view  # the buffer may be resized only once nothing exports it
        if n <= 0:
            return None
        if n < size:
            del buf[n:]
        return buf

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        """Load ``data`` (from :meth:`seq_state` of a context with the same settings) into ``seq``."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(self._lib.llama_state_seq_set_data(self._ctx, buf, len(data), seq)) > 0

    def clear(self) -> None:
        """Empty the cache; its buffers (zeroed by llama.cpp) go back to the kernel again."""
        if self._mem is not None:
            self._lib.llama_memory_clear(self._mem, True)
        else:  # pragma: no cover - older bindings
            self._lib.llama_kv_self_clear(self._ctx)
        kv_pages.release(self._kv_regions)

    def make_sampler(self, params: SamplingParams, history: Sequence[int]) -> NativeSampler:
        """The native chain: logit bias, top-k, penalties, then greedy or top-p/min-p/temp/dist;
        with ``params.grammar``, the grammar constrains it (see :class:`NativeSampler`).

        Top-k runs before the penalties (llama.cpp warns that penalties over the whole vocabulary
        are slow: 262k hash look-ups per token for Gemma); greedy with penalties keeps the top
        ``GREEDY_PENALTY_TOP_K``. Penalties see the prompt (``history``) too, as
        llama-cpp-python's ``create_completion`` does. Neutral samplers are left out.
        """
        lib = self._lib
        n_vocab = self._model.n_vocab
        greedy = params.temperature <= 0.0
        penalised = (
            params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        )
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < n_vocab}
        grammar = self._model.grammar_sampler(params.grammar) if params.grammar else None
        eos = self._model.eos_id
        if greedy and not penalised:
            return NativeSampler(lib, None, self._ctx, n_vocab, bias, grammar, eos)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        if bias:
            arr = (lib.llama_logit_bias * len(bias))()
            for i, (t, b) in enumerate(bias.items()):
                arr[i].token = t
                arr[i].bias = b
            add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        top_k = GREEDY_PENALTY_TOP_K if greedy else max(0, params.top_k)
        if top_k and (penalised or not greedy):
            add(chain, lib.llama_sampler_init_top_k(top_k))
        if penalised:
            pen = lib.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
            for t in history[-PENALTY_LAST_N:]:
                lib.llama_sampler_accept(pen, t)
            add(chain, pen)
        if greedy:
            add(chain, lib.llama_sampler_init_greedy())
        else:
            if params.top_p < 1.0:
                add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, lib.llama_sampler_init_temp(params.temperature))
            seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            add(chain, lib.llama_sampler_init_dist(seed))
        sampler = NativeSampler(lib, chain, self._ctx, n_vocab, None, grammar, eos)
        if bias:  # the chain applies it; logprobs need it too
            import numpy as np

            sampler._bias = (
                np.fromiter(bias.keys(), dtype=np.int64),
                np.fromiter(bias.values(), dtype=np.float32),
            )
        return sampler

    def is_eog(self, token: int) -> bool:
        return self._model.is_eog(token)

    def piece(self, token: int) -> bytes:
        return self._model.piece(token)

    # -- embeddings ---------------------------------------------------------------------------

    def encode(self, tokens: Sequence[int], seqs: Sequence[int]) -> int:
        """Run a batch for embeddings (every token an output); returns the llama.cpp status."""
        n = len(tokens)
        positions: list[int] = []
        counts: dict[int, int] = {}
        for s in seqs:
            positions.append(counts.get(s, 0))
            counts[s] = counts.get(s, 0) + 1
        b = self._batch
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[i]
            b.logits[i] = True
        b.n_tokens = n
        if self._model.has_encoder:
            return int(self._lib.llama_encode(self._ctx, b))
        return int(self._lib.llama_decode(self._ctx, b))

    def seq_embedding(self, seq: int) -> list[float]:
        ptr = self._lib.llama_get_embeddings_seq(self._ctx, seq)
        if not ptr:
            raise EngineError("llama.cpp returned no pooled embedding (model without pooling?)")
        return list(ptr[: self._model.n_embd])

    def close(self) -> None:
        if not self._freed:
            self._freed = True
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
