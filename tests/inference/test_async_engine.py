"""AsyncEngine over a real LLMEngine: streams carry the engine's exact tokens; leaving a stream
aborts the request and frees its blocks; a full engine refuses; shutdown drains, then cuts off;
a crashed loop fails requests. The engine steps only when the test allows it, so none of this
depends on how fast the machine is."""
import asyncio
import threading

import pytest

from inference.async_engine import AsyncEngine, EngineDead, EngineOverloaded, Generation
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from tests.inference.test_detokenizer import ByteTokenizer
from tests.inference.test_engine import CONFIGS, greedy_reference, make_prompts, tiny_model
from utils.errors import UserError

ALL_STEPS = 10**6
PROMPTS = make_prompts(CONFIGS["llama3"].vocab_size)


class GatedEngine:
    """An LLMEngine whose ``step`` waits for a permit from the test (and can be made to crash)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.permits = threading.Semaphore(0)
        self.crash: Exception | None = None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def allow(self, steps: int = ALL_STEPS) -> None:
        self.permits.release(steps)

    def step(self):
        self.permits.acquire()
        if self.crash is not None:
            raise self.crash
        return self.engine.step()


@pytest.fixture(scope="module")
def model():
    return tiny_model(CONFIGS["llama3"])


@pytest.fixture
def gated(model):
    tok = ByteTokenizer([bytes([i]) for i in range(model.cfg.vocab_size)])  # ids 0..127 are ASCII
    return GatedEngine(LLMEngine(model, tokenizer=tok, block_size=4))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


async def collect(stream) -> list:
    return [out async for out in stream]


def all_blocks_free(engine: GatedEngine) -> bool:
    return engine.bm.num_free_blocks == engine.num_blocks


def started(engine: GatedEngine, **kw) -> AsyncEngine:
    """An AsyncEngine whose thread is running; call inside the scenario's event loop."""
    ae = AsyncEngine(engine, **kw)
    ae.start()
    return ae


def run(scenario):
    """Run a scenario on a fresh event loop; a broken engine fails it instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(scenario(), 60))


def test_streams_carry_the_engines_tokens_and_text(gated, model):
    """Two prompts, two greedy samples each: choice k*2+i is sample i of prompt k, and every
    choice's streamed text is the text of the engine's greedy tokens."""
    prompts = PROMPTS[:2]

    async def scenario():
        ae = started(gated)
        params = SamplingParams(max_tokens=6, temperature=0.0, n=2)
        gen = Generation([ae.submit(p, params) for p in prompts], [len(p) for p in prompts])
        gated.allow()
        events = [e async for e in gen.events()]
        await ae.shutdown()
        return events, gen.usage(), ae.num_in_flight

    events, usage, in_flight = run(scenario)
    for choice in range(4):
        want = greedy_reference(model, prompts[choice // 2], 6)
        mine = [e for e in events if e.index == choice]
        assert "".join(e.text for e in mine) == bytes(want).decode()  # the byte tokenizer's text
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + ["length"]
    assert usage == (sum(map(len, prompts)), 4 * 6) and in_flight == 0


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(gated, model):
    prompt = PROMPTS[3]

    async def scenario():
        ae = started(gated)
        stream = ae.submit(prompt, greedy(30))
        gated.allow(3)  # prefill + 2 decode steps, then the engine thread waits
        it = aiter(stream)
        tokens = [t for _ in range(3) for t in (await anext(it)).new_token_ids]
        assert not all_blocks_free(gated)
        await it.aclose()  # the client went away
        freed_at_once = all_blocks_free(gated)
        gated.allow()
        await ae.shutdown()
        return tokens, freed_at_once, ae.num_in_flight

    tokens, freed_at_once, in_flight = run(scenario)
    assert tokens == greedy_reference(model, prompt, 3)
    assert freed_at_once and in_flight == 0 and not gated.has_unfinished()


def test_full_engine_refuses_and_takes_work_again_when_a_request_leaves(gated, model):
    a, b, c = PROMPTS[:3]

    async def scenario():
        ae = started(gated, max_concurrent=2)
        with pytest.raises(UserError, match="exceeds the model's context"):
            ae.submit(list(range(60)), greedy(10))  # can never fit: refused before it counts
        first, second = ae.submit(a, greedy(4)), ae.submit(b, greedy(4))
        with pytest.raises(EngineOverloaded, match="limit 2"):
            ae.submit(c, greedy(4))
        first.close()
        assert ae.num_in_flight == 1
        third = ae.submit(c, greedy(4))
        gated.allow()
        outs = await collect(second), await collect(third)
        await ae.shutdown()
        return [[t for o in out for t in o.new_token_ids] for out in outs]

    assert run(scenario) == [greedy_reference(model, b, 4), greedy_reference(model, c, 4)]


def test_shutdown_refuses_new_requests_and_lets_running_ones_finish(gated, model):
    prompt = PROMPTS[0]

    async def scenario():
        ae = started(gated)
        consumer = asyncio.ensure_future(collect(ae.submit(prompt, greedy(5))))
        closing = asyncio.ensure_future(ae.shutdown(timeout=30))
        await asyncio.sleep(0)  # shutdown has begun
        with pytest.raises(EngineOverloaded, match="shutting down"):
            ae.submit(prompt, greedy(5))
        gated.allow()
        await closing
        return await consumer, ae.healthy

    outs, healthy = run(scenario)
    assert [t for o in outs for t in o.new_token_ids] == greedy_reference(model, prompt, 5)
    assert outs[-1].finish_reason == "length" and not healthy  # the engine thread has stopped


def test_shutdown_timeout_aborts_what_is_still_running(gated, model):
    prompt = PROMPTS[0]

    async def scenario():
        ae = started(gated)
        it = aiter(ae.submit(prompt, greedy(30)))
        gated.allow(2)
        first = [await anext(it), await anext(it)]
        closing = asyncio.ensure_future(ae.shutdown(timeout=0.1))
        # shutdown gives up: the stream ends with an error its client can report, not a silent cut
        with pytest.raises(EngineDead, match="shutting down"):
            [out async for out in it]
        aborted = all_blocks_free(gated)
        gated.allow()  # let the thread see the stop flag
        await closing
        return first, aborted

    first, aborted = run(scenario)
    assert not any(o.finished for o in first) and aborted
    assert not gated.has_unfinished()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_crashed_engine_fails_requests_in_flight_and_new_ones(gated, model):
    prompt = PROMPTS[0]

    async def scenario():
        ae = started(gated)
        stream = ae.submit(prompt, greedy(5))
        gated.crash = RuntimeError("bug in step")
        gated.allow(1)
        with pytest.raises(EngineDead, match="bug in step"):
            await collect(stream)
        await asyncio.to_thread(ae._thread.join, 10)
        assert not ae.healthy
        with pytest.raises(EngineDead, match="bug in step"):
            ae.submit(prompt, greedy(5))

    run(scenario)
