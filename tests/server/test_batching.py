"""Continuous batching: chunked prefill, concurrency and preemption never change the output."""
import pytest

from engine_helpers import PROMPTS, chat_ids, reference, run_to_completion
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_engine():
    return LLMEngine(EngineConfig(heads="none", max_num_seqs=16, max_num_batched_tokens=512,
                                  kv_cache_memory_gb=0.25))


def test_chunked_prefill_equals_one_shot_prefill(random_heads):
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=32, max_tree_nodes=16, kv_cache_memory_gb=0.1),
                       random_heads)
    long_prompt = " ".join(PROMPTS)  # ~250 tokens: eight or more chunks of at most 32
    ids = chat_ids(engine.tokenizer, long_prompt)
    assert len(ids) > 4 * 32
    outputs = run_to_completion(engine, {"long": (ids, PARAMS)})
    assert outputs["long"] == reference(engine, ids, PARAMS)


def test_4_concurrent_requests_equal_each_alone(plain_engine):
    prompts = [chat_ids(plain_engine.tokenizer, p) for p in PROMPTS[16:20]]
    together = run_to_completion(plain_engine, {str(i): (ids, PARAMS) for i, ids in enumerate(prompts)})
    for i, ids in enumerate(prompts):
        assert together[str(i)] == reference(plain_engine, ids, PARAMS)


@pytest.mark.slow
def test_16_concurrent_requests_equal_each_alone(plain_engine):
    prompts = [chat_ids(plain_engine.tokenizer, p) for p in PROMPTS[:16]]
    together = run_to_completion(plain_engine, {str(i): (ids, PARAMS) for i, ids in enumerate(prompts)})
    for i, ids in enumerate(prompts):
        assert together[str(i)] == reference(plain_engine, ids, PARAMS), PROMPTS[i]


def test_preempted_requests_finish_with_the_same_output(random_heads):
    # room for about two requests at a time (16-node trees need room to verify): the
    # others are preempted and recomputed
    engine = LLMEngine(EngineConfig(kv_cache_memory_gb=8 * 16 * 30 * 2 * 3 * 64 * 4 / 2**30, block_size=16,
                                    max_num_batched_tokens=64, max_tree_nodes=16, tree_budget=16), random_heads)
    assert engine.block_manager.num_blocks == 8
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [chat_ids(engine.tokenizer, p)[-20:] for p in PROMPTS[:4]]  # 20-token prompts
    from server import metrics
    before = metrics.num_preemptions._value.get()
    outputs = run_to_completion(engine, {str(i): (ids, params) for i, ids in enumerate(prompts)})
    assert metrics.num_preemptions._value.get() > before, "the test meant to force preemption"
    for i, ids in enumerate(prompts):
        assert outputs[str(i)] == reference(engine, ids, params)
    assert engine.block_manager.num_free_blocks == 8


def test_waiting_requests_are_served_first_come_first_served(plain_engine):
    plain_engine.config.max_num_seqs = 2
    plain_engine.scheduler.max_num_seqs = 2
    try:
        ids = chat_ids(plain_engine.tokenizer, PROMPTS[0])
        order = []
        for i in range(4):
            plain_engine.add_request(f"q{i}", ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        while plain_engine.has_unfinished_requests():
            order += [o.request_id for o in plain_engine.step() if o.finish_reason]
        assert order == ["q0", "q1", "q2", "q3"]
    finally:
        plain_engine.scheduler.max_num_seqs = 16
