"""AsyncEngine's thread, inboxes and per-request queues, against a fake engine."""
import asyncio

import pytest

from server.async_engine import AsyncEngine, EngineNotReadyError, QueueFullError
from server.config import EngineConfig
from server.sampling_params import SamplingParams
from api_fakes import FakeEngine


def started(fake: FakeEngine, **config) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(**config), engine_factory=lambda: fake)
    engine.start()
    assert engine.wait_until_loaded(5) and engine.is_ready
    return engine


async def collect(engine, request_id, prompt=(1, 2), max_tokens=3):
    return [out async for out in engine.generate(request_id, list(prompt), SamplingParams(max_tokens=max_tokens))]


def test_streams_outputs_until_finished():
    async def main():
        engine = started(FakeEngine())
        outs = await collect(engine, "a", max_tokens=4)
        assert [o.text for o in outs] == [" one", " two", " three", " four"]
        assert [o.finish_reason for o in outs] == [None, None, None, "length"]
        both = await asyncio.gather(collect(engine, "b", max_tokens=2), collect(engine, "c", max_tokens=5))
        assert [len(x) for x in both] == [2, 5]
        assert engine.num_active == 0
        await engine.shutdown(1)
    asyncio.run(main())


def test_closing_the_iterator_aborts_the_request():
    async def main():
        fake = FakeEngine()
        engine = started(fake)
        stream = engine.generate("a", [1], SamplingParams(max_tokens=50))
        first = await anext(stream)
        assert first.text == " one"
        await stream.aclose()
        for _ in range(100):
            if fake.aborted:
                break
            await asyncio.sleep(0.01)
        assert fake.aborted == ["a"] and not fake.requests and engine.num_active == 0
        await engine.shutdown(1)
    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on():
    async def main():
        fake = FakeEngine(fail_on="nine")
        engine = started(fake)
        outs = await collect(engine, "bad", prompt=fake.tokenizer.encode("nine"))
        assert outs[-1].finish_reason == "error" and "boom" in outs[-1].error
        assert "bad" in fake.aborted
        good = await collect(engine, "good")
        assert good[-1].finish_reason == "length"
        await engine.shutdown(1)
    asyncio.run(main())


def test_refusals_raise_before_any_output():
    async def main():
        fake = FakeEngine()
        engine = started(fake, max_queue_size=2)
        with pytest.raises(ValueError, match="prompt of 1 tokens"):
            await collect(engine, "long", prompt=[1], max_tokens=64)
        fake.waiting = 2
        with pytest.raises(QueueFullError):
            await collect(engine, "full")
        fake.waiting = 0
        assert len(await collect(engine, "ok")) == 3
        await engine.shutdown(1)
        with pytest.raises(EngineNotReadyError):
            await collect(engine, "late")
    asyncio.run(main())


def test_shutdown_lets_requests_finish_then_aborts_the_rest():
    async def main():
        fake = FakeEngine(step_delay=0.02)
        engine = started(fake)
        short = asyncio.create_task(collect(engine, "short", max_tokens=3))
        endless = asyncio.create_task(collect(engine, "endless", max_tokens=60))
        await asyncio.sleep(0.01)
        await engine.shutdown(timeout=0.3)
        assert (await short)[-1].finish_reason == "length"
        assert fake.aborted == ["endless"] and not engine.is_ready
        endless.cancel()
    asyncio.run(main())


def test_a_failed_load_is_reported():
    def broken():
        raise OSError("no such model")
    engine = AsyncEngine(EngineConfig(), engine_factory=broken)
    engine.start()
    assert engine.wait_until_loaded(5)
    assert not engine.is_ready and isinstance(engine.load_error, OSError)
