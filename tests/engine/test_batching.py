"""The continuous-batching scheduler against the fake llama context (pure logic, no model)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agent.engine.base import GenerationChunk, SamplingParams
from agent.engine.batching import BatchRunner, Job
from agent.errors import ContextOverflow, EngineError, Overloaded
from tests.fakes.decode_backend import FakeDecodeBackend, next_token, piece_of, reference

GREEDY = SamplingParams(temperature=0.0)


def job(tokens: list[int], max_tokens: int = 12, **kw: Any) -> Job:
    return Job(
        tokens=tokens,
        max_tokens=max_tokens,
        sampling=kw.pop("sampling", GREEDY),
        stops=kw.pop("stops", ()),
        deadline=kw.pop("deadline", None),
        loop=asyncio.get_running_loop(),
        **kw,
    )


async def drain(j: Job, timeout: float = 10.0) -> tuple[str, GenerationChunk]:
    parts: list[str] = []
    while True:
        item = await asyncio.wait_for(j.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        parts.append(item.text)
        if item.finish_reason is not None:
            return "".join(parts), item


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


@contextlib.asynccontextmanager
async def running(backend: FakeDecodeBackend, **kw: Any) -> AsyncIterator[BatchRunner]:
    """A runner over ``backend``; on the way out the backend's gate is opened and the runner closed."""
    runner = BatchRunner(backend, **kw)
    try:
        yield runner
    finally:
        backend.run_free()
        runner.close()


def prompts(n: int, length: int = 5) -> list[list[int]]:
    return [[1 + (i * 7 + k) % 90 for k in range(length + i)] for i in range(n)]


def test_single_job_matches_the_model_run_alone() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend()
        async with running(backend) as runner:
            p = prompts(1)[0]
            j = job(p, 12)
            runner.submit(j)
            text, final = await drain(j)
            want, reason = reference(p, 12)
            assert (text, final.finish_reason) == (want, reason)
            assert final.usage is not None and final.usage.prompt_tokens == len(p)
            assert final.usage.completion_tokens == len(want)

    run(main)


def test_concurrent_jobs_share_batches_and_each_equals_its_solo_run() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=4, n_batch=64)
        async with running(backend) as runner:
            ps = prompts(4)
            jobs = [job(p, 16) for p in ps]
            for j in jobs:
                runner.submit(j)
            results = await asyncio.gather(*(drain(j) for j in jobs))
            for p, (text, final) in zip(ps, results, strict=True):
                assert (text, final.finish_reason) == reference(p, 16)
            assert any(len(set(b.seqs)) > 1 for b in backend.batches), "sequences were decoded together"

    run(main)


def test_new_request_joins_between_steps_of_a_running_stream() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=64)
        backend.hold()
        async with running(backend) as runner:
            a, b = prompts(2)
            ja = job(a, 30)
            runner.submit(ja)
            backend.step(5)  # prompt of a + 4 generated tokens
            first = await asyncio.wait_for(ja.queue.get(), 5)
            assert isinstance(first, GenerationChunk) and first.text
            jb = job(b, 5)
            runner.submit(jb)
            backend.run_free()
            (ta, _fa), (tb, _fb) = await asyncio.gather(drain(ja), drain(jb))
            assert first.text + ta == reference(a, 30)[0]
            assert tb == reference(b, 5)[0]
            mixed = [bt for bt in backend.batches if len(set(bt.seqs)) == 2]
            assert mixed, "b's prompt went into a batch with a's next token"

    run(main)


def test_long_prompt_is_chunked_while_another_sequence_generates() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=32, n_ctx=512)
        async with running(backend, prefill_chunk=8) as runner:
            short = [5, 6, 7]
            long = [1 + k % 80 for k in range(100)]
            js = job(short, 40)
            runner.submit(js)
            await asyncio.wait_for(js.queue.get(), 5)
            jl = job(long, 4)
            runner.submit(jl)
            await asyncio.gather(drain(js), drain(jl))
            slot_long = jl.slot
            for bt in backend.batches:
                others = [s for s in bt.seqs if s != slot_long]
                prompt_rows = [s for s in bt.seqs if s == slot_long]
                if others and len(prompt_rows) > 1:
                    assert len(prompt_rows) <= 8, "prompt chunk capped while a stream runs"
            assert all(len(bt.tokens) <= 32 for bt in backend.batches)

    run(main)


def test_second_turn_reuses_the_cached_prefix() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=64)
        async with running(backend, prefill_chunk=8) as runner:
            turn1 = [3 + k % 50 for k in range(40)]
            j1 = job(turn1, 6)
            runner.submit(j1)
            text1, _ = await drain(j1)
            generated = [ord(c) - ord("a") for c in text1]  # not the real ids: a different suffix
            turn2 = [*turn1, *generated, 9, 9, 9]
            decoded_before = runner.stats.prompt_tokens
            j2 = job(turn2, 6)
            runner.submit(j2)
            text2, _ = await drain(j2)
            assert text2 == reference(turn2, 6)[0]
            assert j2.slot == j1.slot
            assert j2.reused == len(turn1)  # 40 = five whole chunks of 8
            assert runner.stats.prompt_tokens - decoded_before == len(turn2) - j2.reused

    run(main)


def test_identical_prompt_reuses_whole_chunks_and_decodes_the_rest() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1)
        async with running(backend, prefill_chunk=8) as runner:
            p = [1 + k % 40 for k in range(20)]
            for _ in range(2):
                j = job(p, 4)
                runner.submit(j)
                text, _ = await drain(j)
                assert text == reference(p, 4)[0]
            assert j.reused == 16  # chunks [0, 8) and [8, 16); [16, 20) is decoded again
            second = [b for b in backend.batches if b.positions[0] == 16 and len(b.tokens) == 4]
            assert len(second) == 2, "the tail chunk is cut the same way both times"

    run(main)


def test_prompt_chunks_start_at_fixed_positions_and_run_alone() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=3, n_batch=64, n_ctx=512)
        async with running(backend, prefill_chunk=8) as runner:
            ps = [[1 + (i + k) % 50 for k in range(13 + 7 * i)] for i in range(3)]
            jobs = [job(p, 10) for p in ps]
            for j in jobs:
                runner.submit(j)
                await asyncio.sleep(0.01)
            for p, j in zip(ps, jobs, strict=True):
                assert (await drain(j))[0] == reference(p, 10)[0]
            for b in backend.batches:
                if len(b.tokens) > 1 and len(set(b.seqs)) == 1 and b.positions == sorted(b.positions):
                    prompt_rows = b.positions
                    assert prompt_rows[0] % 8 == 0, b
                    assert prompt_rows[-1] // 8 == prompt_rows[0] // 8, "a chunk never crosses a boundary"
            for b in backend.batches:
                if len(set(b.seqs)) > 1:
                    assert all(b.logits), "only generating rows share a batch"

    run(main)


def test_cache_that_cannot_be_truncated_is_dropped_whole() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1, partial_rm=False)
        async with running(backend) as runner:
            a = [4, 5, 6, 7, 8]
            b = [4, 5, 6, 9, 9]
            for p in (a, b):
                j = job(p, 4)
                runner.submit(j)
                assert (await drain(j))[0] == reference(p, 4)[0]
            assert j.reused == 0

    run(main)


def test_cancelled_job_frees_its_slot_at_the_next_step() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1)
        backend.hold()
        async with running(backend, max_queue=4) as runner:
            ja = job(prompts(1)[0], 200)
            runner.submit(ja)
            backend.step(2)
            await asyncio.wait_for(ja.queue.get(), 5)
            jb = job([9, 8, 7], 3)
            runner.submit(jb)
            runner.cancel(ja)
            backend.run_free()
            text, _final = await drain(jb)
            assert text == reference([9, 8, 7], 3)[0]
            _, fa = await drain(ja)
            assert fa.finish_reason == "cancelled"
            assert runner.n_running == 0
            assert all(s.closed for s in backend.samplers)

    run(main)


def test_queue_beyond_slots_plus_max_queue_is_refused_with_429() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1)
        backend.hold()
        async with running(backend, max_queue=2) as runner:
            jobs = [job([1, 2, 3], 50) for _ in range(3)]
            for j in jobs:
                runner.submit(j)
            with pytest.raises(Overloaded) as err:
                runner.submit(job([1, 2, 3], 5))
            assert err.value.status == 429
            assert err.value.retry_after > 0
            assert "3 requests in flight" in str(err.value)
            for j in jobs:
                runner.cancel(j)
            backend.run_free()
            for j in jobs:
                await drain(j)

    run(main)


def test_deadline_ends_generation_with_length() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend()
        now = [0.0]
        async with running(backend, clock=lambda: now[0]) as runner:
            backend.hold()
            j = job(prompts(1)[0], 100, deadline=5.0)
            runner.submit(j)
            backend.step(3)
            await asyncio.wait_for(j.queue.get(), 5)
            now[0] = 10.0
            backend.run_free()
            _, final = await drain(j)
            assert final.finish_reason == "length"
            assert final.usage is not None and final.usage.completion_tokens < 100

    run(main)


def test_stop_string_cuts_text_before_it() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend()
        async with running(backend) as runner:
            p = prompts(1)[0]
            full, _ = reference(p, 20)
            stop = full[6:8]
            j = job(p, 20, stops=(stop,))
            runner.submit(j)
            text, final = await drain(j)
            assert final.finish_reason == "stop"
            assert text == full[: full.index(stop)]

    run(main)


def test_stop_token_ends_generation_without_text() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend()
        async with running(backend) as runner:
            p = prompts(1)[0]
            full, _ = reference(p, 20)
            history = list(p)
            for _ in range(4):
                history.append(next_token(history))
            j = job(p, 20, stop_tokens=frozenset({history[-1]}))
            runner.submit(j)
            text, final = await drain(j)
            assert final.finish_reason == "stop"
            assert full.startswith(text) and len(text) < 4

    run(main)


def test_jobs_that_do_not_fit_the_kv_budget_wait_instead_of_failing() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=4, n_ctx=64, n_batch=64)
        async with running(backend) as runner:
            ps = [[1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10] for i in range(4)]  # 10 + 20 = 30 cells each
            jobs = [job(p, 20) for p in ps]
            for j in jobs:
                runner.submit(j)
            results = await asyncio.gather(*(drain(j) for j in jobs))
            for p, (text, _) in zip(ps, results, strict=True):
                assert text == reference(p, 20)[0]
            assert max(len(set(bt.seqs)) for bt in backend.batches) <= 2, "only two fit at a time"

    run(main)


def test_job_larger_than_the_context_is_refused_not_left_waiting() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_ctx=32)
        async with running(backend) as runner:
            j = job([1, 2, 3], 40)
            runner.submit(j)
            with pytest.raises(ContextOverflow, match="43 tokens exceed the context of 32"):
                await drain(j)
            ok = job([1, 2, 3], 5)
            runner.submit(ok)
            assert (await drain(ok))[0] == reference([1, 2, 3], 5)[0]

    run(main)


def test_separate_kv_streams_run_jobs_that_would_not_fit_together() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=4, n_ctx=64, n_batch=64, shared_kv=False)
        async with running(backend) as runner:
            ps = [[1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10] for i in range(4)]  # 10 + 40 = 50 cells each
            jobs = [job(p, 40) for p in ps]
            for j in jobs:
                runner.submit(j)
            results = await asyncio.gather(*(drain(j) for j in jobs))
            for p, (text, _) in zip(ps, results, strict=True):
                assert text == reference(p, 40)[0]
            assert max(len(set(bt.seqs)) for bt in backend.batches) >= 3, "they ran together"

    run(main)


def test_generation_rows_are_in_slot_order_when_a_later_job_takes_a_lower_slot() -> None:
    """llama.cpp splits a batch into one micro-batch per run of consecutive sequence ids (KV
    stream per slot), so the rows must be sorted by slot, not by arrival."""

    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=4, n_ctx=64, n_batch=64, shared_kv=False)
        async with running(backend) as runner:
            ps = [[1 + i, 2, 3, 4, 5, 6] for i in range(5)]
            jobs = [job(p, 2 if i == 0 else 30) for i, p in enumerate(ps)]
            for j in jobs:
                runner.submit(j)  # the fifth waits for the first one's slot (0)
            results = await asyncio.gather(*(drain(j) for j in jobs))
            for p, j, (text, _) in zip(ps, jobs, results, strict=True):
                assert text == reference(p, j.max_tokens)[0]
            rows = [bt.seqs for bt in backend.batches if len(bt.seqs) > 1 and all(bt.logits)]
            assert any(0 in r and len(r) > 1 for r in rows[2:]), "the fifth job generated beside the others"
            assert all(r == sorted(r) for r in rows), rows

    run(main)


def test_decode_failure_fails_the_jobs_in_that_batch() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(fail_status=-3)
        async with running(backend) as runner:
            j = job([1, 2, 3], 5)
            runner.submit(j)
            with pytest.raises(EngineError, match="status -3"):
                await drain(j)
            backend.fail_status = None
            ok = job([1, 2, 3], 5)
            runner.submit(ok)
            assert (await drain(ok))[0] == reference([1, 2, 3], 5)[0]

    run(main)


def test_logit_bias_reaches_the_sampler() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend()
        async with running(backend) as runner:
            p = prompts(1)[0]
            banned = next_token(p)
            j = job(p, 1, sampling=SamplingParams(temperature=0.0, logit_bias={banned: -100.0}))
            runner.submit(j)
            text, _ = await drain(j)
            assert text != piece_of(banned).decode()

    run(main)


def test_close_fails_running_jobs_and_refuses_new_ones() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1)
        backend.hold()
        runner = BatchRunner(backend)
        j = job([1, 2, 3], 50)
        runner.submit(j)
        backend.step(2)
        await asyncio.wait_for(j.queue.get(), 5)
        closing = asyncio.get_running_loop().run_in_executor(None, runner.close)
        await asyncio.sleep(0.05)
        backend.run_free()
        await closing
        with pytest.raises(EngineError, match="shutting down"):
            runner.submit(job([1], 1))
        with pytest.raises(EngineError, match="shut down"):
            await drain(j)

    run(main)


MODES = [pytest.param(True, id="batch-invariant"), pytest.param(False, id="fast")]


@pytest.mark.parametrize(
    ("invariant", "want"),
    [
        pytest.param(True, 16, id="batch-invariant-whole-chunks"),
        pytest.param(False, 19, id="fast-all-but-the-last-token"),
    ],
)
def test_identical_prompt_reuse_by_mode(invariant: bool, want: int) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=1)
        async with running(backend, prefill_chunk=8, batch_invariant=invariant) as runner:
            p = [1 + k % 40 for k in range(20)]
            for _ in range(2):
                j = job(p, 4)
                runner.submit(j)
                assert (await drain(j))[0] == reference(p, 4)[0]
            assert j.reused == want

    run(main)


@pytest.mark.parametrize(
    ("invariant", "turn1_len", "want"),
    [
        pytest.param(True, 37, 32, id="batch-invariant-rounded-down"),
        pytest.param(False, 37, 37, id="fast-token-exact"),
    ],
)
def test_second_turn_reuse_by_mode(invariant: bool, turn1_len: int, want: int) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=64)
        async with running(backend, prefill_chunk=8, batch_invariant=invariant) as runner:
            turn1 = [3 + k % 50 for k in range(turn1_len)]
            j1 = job(turn1, 6)
            runner.submit(j1)
            await drain(j1)
            turn2 = [*turn1, 91, 92, 93]
            before = runner.stats.prompt_tokens
            j2 = job(turn2, 6)
            runner.submit(j2)
            assert (await drain(j2))[0] == reference(turn2, 6)[0]
            assert j2.reused == want
            assert runner.stats.prompt_tokens - before == len(turn2) - want

    run(main)


@pytest.mark.parametrize("invariant", MODES)
def test_prefix_held_by_a_busy_slot_is_copied_not_recomputed(invariant: bool) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=64, shared_kv=False)
        async with running(backend, prefill_chunk=8, batch_invariant=invariant, copy_min_gain=4) as runner:
            shared = [5 + k % 60 for k in range(41)]
            a = [*shared, 1, 2]
            b = [*shared, 3, 4, 6]
            ja = job(a, 40)
            backend.hold()
            runner.submit(ja)
            while ja.generated < 2:  # a is generating: its slot is busy
                backend.step()
                await asyncio.sleep(0.01)
            jb = job(b, 6)
            runner.submit(jb)
            await asyncio.sleep(0.01)
            backend.run_free()
            assert (await drain(jb))[0] == reference(b, 6)[0]
            assert (await drain(ja))[0] == reference(a, 40)[0]
            want = 40 if invariant else 41
            assert jb.reused == want
            assert backend.copies == [(ja.slot, jb.slot, want)]

    run(main)


@pytest.mark.parametrize("invariant", MODES)
def test_prefix_shared_by_eight_concurrent_requests_is_computed_once(invariant: bool) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=8, n_batch=64, n_ctx=512, shared_kv=False)
        async with running(backend, prefill_chunk=16, batch_invariant=invariant, copy_min_gain=4) as runner:
            shared = [2 + k % 70 for k in range(150)]
            ps = [[*shared, 80 + i, 81, 82 + i % 3] for i in range(8)]
            backend.hold()
            jobs = [job(p, 5) for p in ps]
            for j in jobs:
                runner.submit(j)
            backend.run_free()
            for p, j in zip(ps, jobs, strict=True):
                assert (await drain(j))[0] == reference(p, 5)[0]
            keep = 144 if invariant else 150
            assert [j.reused for j in jobs[1:]] == [keep] * 7
            assert runner.stats.prompt_tokens == len(ps[0]) + 7 * (len(ps[0]) - keep)
            assert runner.stats.copied_tokens == 7 * keep

    run(main)


def test_follower_of_a_cancelled_leader_decodes_its_prompt_itself() -> None:
    async def main() -> None:
        backend = FakeDecodeBackend(n_slots=2, n_batch=16, n_ctx=512, shared_kv=False)
        async with running(backend, prefill_chunk=8, batch_invariant=False, copy_min_gain=4) as runner:
            shared = [2 + k % 70 for k in range(100)]
            a, b = [*shared, 1], [*shared, 2]
            backend.hold()
            ja, jb = job(a, 5), job(b, 5)
            runner.submit(ja)
            runner.submit(jb)
            backend.step(3)
            runner.cancel(ja)
            backend.run_free()
            assert (await drain(jb))[0] == reference(b, 5)[0]
            assert jb.reused <= 100

    run(main)


def test_prompt_cache_on_disk_serves_a_shared_prefix_after_a_restart(tmp_path: Any) -> None:
    """A prefix two requests shared is saved (exactly those cells); after a restart a third
    request starting with it loads it instead of decoding it."""
    from agent.engine.prompt_cache import PromptCache

    system = [2 + k % 70 for k in range(200)]

    async def serve(*prompts: list[int]) -> tuple[list[Job], BatchRunner, PromptCache]:
        backend = FakeDecodeBackend(n_slots=2, n_batch=64, n_ctx=512, shared_kv=False)
        cache = PromptCache(tmp_path, b"k" * 32, max_bytes=1 << 20, min_tokens=64)
        jobs = []
        async with running(backend, prefill_chunk=16, batch_invariant=False, prompt_cache=cache) as r:
            for p in prompts:
                j = job(p, 5)
                r.submit(j)
                assert (await drain(j))[0] == reference(p, 5)[0]
                jobs.append(j)
        cache.close()
        return jobs, r, cache

    async def main() -> None:
        _, _, cache = await serve([*system, 90, 91])
        assert cache.saved == 0, "seen once: nothing saved"
        _, _, cache = await serve([*system, 90, 91], [*system, 92, 93])
        assert cache.saved == 1
        (third,), runner, cache = await serve([*system, 94, 95, 96])
        assert third.reused == 200 and runner.stats.disk_tokens == 200
        assert runner.stats.prompt_tokens == 3
        assert cache.saved == 0, "the same prefix is not saved twice"

    run(main)
