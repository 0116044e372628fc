"""The prefix cache end to end: a shared beginning is computed once and changes no output."""
import pytest

from engine_helpers import PROMPTS, chat_ids, reference, run_to_completion
from server import metrics
from server.block_manager import chain_hashes
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
SYSTEM = "You are the test assistant of an inference server. Answer briefly, plainly and correctly. " * 4


def with_system(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])


def hits() -> float:
    return metrics.prefix_cache_hits._value.get()


def shared_tokens(earlier: list[int], later: list[int], block_size: int) -> int:
    """The tokens a later prompt finds cached after `earlier` (fully cached) ran: whole
    blocks of their common beginning, short of the later prompt's last token."""
    common = next((i for i, (a, b) in enumerate(zip(earlier, later)) if a != b), min(len(earlier), len(later)))
    return min(common, len(later) - 1) // block_size * block_size


@pytest.fixture(scope="module")
def engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25), random_heads)


def test_a_shared_system_prompt_is_computed_once_and_changes_no_output(engine):
    tokenizer, size = engine.tokenizer, engine.config.block_size
    first = with_system(tokenizer, PROMPTS[0])
    assert run_to_completion(engine, {"first": (first, GREEDY)})["first"] == reference(engine, first, GREEDY)
    others = [with_system(tokenizer, p) for p in PROMPTS[1:4]]
    expected = [shared_tokens(first, ids, size) for ids in others]
    assert min(expected) >= 4 * size          # the system prompt's blocks
    before = hits()
    outputs = run_to_completion(engine, {str(i): (ids, GREEDY) for i, ids in enumerate(others)})
    assert hits() - before == sum(expected)   # all three at once, each from the first's blocks
    for i, ids in enumerate(others):
        assert outputs[str(i)] == reference(engine, ids, GREEDY), PROMPTS[i + 1]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_conversation_starts_after_its_earlier_turns_answer_included(engine):
    size = engine.config.block_size
    turn1 = with_system(engine.tokenizer, PROMPTS[4])
    answer = run_to_completion(engine, {"turn1": (turn1, GREEDY)})["turn1"]
    turn2 = turn1 + answer + chat_ids(engine.tokenizer, PROMPTS[5])[1:]
    cached = (len(turn1) + len(answer) - 1) // size * size   # all but the last token kept its keys
    before = hits()
    assert run_to_completion(engine, {"turn2": (turn2, GREEDY)})["turn2"] == reference(engine, turn2, GREEDY)
    assert hits() - before == cached > len(turn1)


def test_an_aborted_request_frees_its_shares_and_keeps_the_prefix_for_others(engine):
    tokenizer, size = engine.tokenizer, engine.config.block_size
    warm = with_system(tokenizer, PROMPTS[6])
    run_to_completion(engine, {"warm": (warm, GREEDY)})
    ids = with_system(tokenizer, PROMPTS[7])
    before = hits()
    engine.add_request("doomed", ids, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    doomed = engine.sequences["doomed"]
    assert hits() - before == shared_tokens(warm, ids, size) > 0 and doomed.num_output_tokens > 0
    engine.abort_request("doomed")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(count == 0 for count in engine.block_manager.ref_counts)
    again = with_system(tokenizer, PROMPTS[8])
    before = hits()
    assert run_to_completion(engine, {"again": (again, GREEDY)})["again"] == reference(engine, again, GREEDY)
    # the system turn and what the aborted request computed of its own prompt stay cached
    assert hits() - before == max(shared_tokens(warm, again, size), shared_tokens(ids, again, size))


def test_a_salt_shares_blocks_only_with_requests_of_the_same_salt(engine):
    ids = with_system(engine.tokenizer, PROMPTS[9])
    usable = shared_tokens(ids, ids, engine.config.block_size)
    found = []
    for name, salt in (("a", "tenant-a"), ("b", "tenant-b"), ("c", None), ("d", "tenant-a")):
        before = hits()
        params = SamplingParams(max_tokens=4, temperature=0.0, cache_salt=salt)
        assert run_to_completion(engine, {name: (ids, params)})[name] == reference(engine, ids, params)
        found.append(hits() - before)
    assert found[0] < usable and found[1] == 0 and found[3] == usable   # c found the unsalted system turn


def test_requests_arriving_together_compute_their_common_beginning_once(engine):
    """Three choices of one prompt and two other requests with the same system prompt, all
    added at once: the first computes its prompt, the others wait for its blocks and
    compute only what they do not share."""
    tokenizer, size = engine.tokenizer, engine.config.block_size
    engine.reset_prefix_cache()
    ids = with_system(tokenizer, PROMPTS[10])
    others = [with_system(tokenizer, p) for p in PROMPTS[11:13]]
    requests = {"a": ids, "b": ids, "c": ids, "d": others[0], "e": others[1]}
    shared = [shared_tokens(ids, ids, size)] * 2 + [shared_tokens(ids, other, size) for other in others]
    before, computed = hits(), metrics.prompt_tokens._value.get()
    outputs = run_to_completion(engine, {name: (prompt, GREEDY) for name, prompt in requests.items()})
    assert hits() - before == sum(shared)
    assert metrics.prompt_tokens._value.get() - computed == sum(map(len, requests.values())) - sum(shared)
    for name, prompt in requests.items():
        assert outputs[name] == reference(engine, prompt, GREEDY), name


def test_eviction_and_preemption_under_memory_pressure_keep_outputs_exact(random_heads):
    """Twelve blocks: prompts evict each other's cached blocks, run together they preempt
    each other and resume from what is still cached; every output stays exact and every
    block comes back."""
    engine = LLMEngine(EngineConfig(kv_cache_memory_gb=12 * 16 * 30 * 2 * 3 * 64 * 4 / 2**30, block_size=16,
                                    max_num_batched_tokens=64, max_tree_nodes=16, tree_budget=8), random_heads)
    manager = engine.block_manager
    assert manager.num_blocks == 12
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [chat_ids(engine.tokenizer, p) for p in PROMPTS[9:15]]
    references = [reference(engine, ids, params) for ids in prompts]
    for i, ids in enumerate(prompts):
        assert run_to_completion(engine, {str(i): (ids, params)})[str(i)] == references[i]
    first_blocks = chain_hashes(prompts[0], 16, [], len(prompts[0]) // 16)
    assert not all(h in manager.cached for h in first_blocks), "the test meant to evict the first prompt's blocks"
    preemptions = metrics.num_preemptions._value.get()
    outputs = run_to_completion(engine, {str(i): (ids, params) for i, ids in enumerate(prompts)})
    assert metrics.num_preemptions._value.get() > preemptions, "the test meant to force preemption"
    assert [outputs[str(i)] for i in range(len(prompts))] == references
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.ref_counts)


def test_without_prefix_caching_every_prompt_is_computed_whole(random_heads):
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, prefix_caching=False),
                       random_heads)
    ids = with_system(engine.tokenizer, PROMPTS[0])
    before, computed = hits(), metrics.prompt_tokens._value.get()
    first = run_to_completion(engine, {"a": (ids, GREEDY)})["a"]
    assert run_to_completion(engine, {"b": (ids, GREEDY)})["b"] == first == reference(engine, ids, GREEDY)
    assert hits() == before and not engine.block_manager.cached
    assert metrics.prompt_tokens._value.get() - computed == 2 * len(ids)


def test_accepted_trees_beside_shared_blocks_and_cut_answers_keep_the_next_turn_exact(random_heads):
    """Fixed 8-node trees on a text that repeats itself: lookup chains are accepted, so kept
    rows are moved into place beside shared blocks, and the last step's tokens are cut at
    max_tokens; the next turn starts from the cached answer and stays exact."""
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, tree_budget=8), random_heads)
    size = engine.config.block_size
    verse = "one two three four five six seven eight nine ten. "
    turn1 = with_system(engine.tokenizer, "Repeat this line five times: " + verse * 3)
    params = SamplingParams(max_tokens=45, temperature=0.0, ignore_eos=True)
    accepted = metrics.spec_accepted_tokens._value.get()
    answer = run_to_completion(engine, {"turn1": (turn1, params)})["turn1"]
    assert answer == reference(engine, turn1, params) and len(answer) == 45
    assert metrics.spec_accepted_tokens._value.get() - accepted >= 8, "the test meant trees to keep tokens"
    turn2 = turn1 + answer + chat_ids(engine.tokenizer, "Now count backwards.")[1:]
    before = hits()
    assert run_to_completion(engine, {"turn2": (turn2, params)})["turn2"] == reference(engine, turn2, params)
    assert hits() - before >= (len(turn1) + len(answer) - 1) // size * size - size   # the answer's blocks too
