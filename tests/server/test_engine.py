"""The engine end to end: speculation is exact, batching is exact, nothing is lost or leaked."""
import pytest
import torch

from engine_helpers import PROMPTS, chat_ids, reference, run_to_completion
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams
from server.tree import tree_of

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25), random_heads)


@pytest.fixture(scope="module")
def references(engine):
    cache = {}

    def get(prompt, params=GREEDY):
        key = (prompt, params)
        if key not in cache:
            cache[key] = reference(engine, chat_ids(engine.tokenizer, prompt), params)
        return cache[key]
    return get


def check_exact(engine, references, prompts, params=GREEDY):
    requests = {str(i): (chat_ids(engine.tokenizer, p), params) for i, p in enumerate(prompts)}
    outputs = run_to_completion(engine, requests)
    for i, prompt in enumerate(prompts):
        assert outputs[str(i)] == references(prompt, params), prompt


def test_speculative_greedy_equals_plain_greedy_batch_1(engine, references):
    for prompt in PROMPTS[:3]:
        check_exact(engine, references, [prompt])


def test_batch_of_8_different_lengths_equals_plain_greedy(engine, references):
    check_exact(engine, references, PROMPTS[3:11])


@pytest.mark.parametrize("chained", [False, True], ids=["independent", "chained"])
def test_heads_reading_the_next_token_are_exact_in_a_batch(model, random_heads, references, chained):
    from types import SimpleNamespace

    from models.heads import HeadsConfig, MedusaHeads
    torch.manual_seed(99)
    heads = MedusaHeads(HeadsConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                                    token_input=True, chained=chained))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    heads.set_draft_vocab(torch.arange(0, model.config.vocab_size, 3))
    override = SimpleNamespace(heads=heads, tree_paths=random_heads.tree_paths, accuracies=random_heads.accuracies)
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, tree_budget=8), override)
    check_exact(engine, references, PROMPTS[11:15])  # a fixed tree of 8: every decode step drafts


@pytest.mark.slow
def test_speculative_greedy_exact_on_22_prompts_batch_1_and_8(engine, references):
    check_exact_alone_and_in_batches(engine, references)


def check_exact_alone_and_in_batches(engine, references):
    for prompt in PROMPTS:
        check_exact(engine, references, [prompt])
    for start in range(0, len(PROMPTS), 8):
        check_exact(engine, references, PROMPTS[start:start + 8])


def test_kv_commit_moves_accepted_rows_into_place(random_heads, monkeypatch):
    """Heads replaced by an oracle that puts the true continuation at rank 1 (rank 0 is wrong),
    so accepted paths run through nodes whose tree index differs from their depth and the
    commit has rows to move. Every committed row must equal a plain prefill's."""
    engine = LLMEngine(EngineConfig(tree_budget=16, max_num_batched_tokens=64, max_tree_nodes=16,
                                    kv_cache_memory_gb=0.05), random_heads)
    ids = chat_ids(engine.tokenizer, PROMPTS[1])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = reference(engine, ids, params)
    execute = engine.runner.execute
    # the deepest tree path that goes through a rank other than 0
    path = max((p for p in tree_of(engine.runner.tree_paths, 16).paths if any(p)), key=len)
    assert len(path) >= 2

    def with_oracle_drafts(batch):
        results = execute(batch)
        for item, result in results:
            future = expected[item.seq.num_output_tokens + len(result.new_token_ids):]
            for j, node in enumerate(engine.runner.tree_paths[:len(result.draft or [])]):
                depth = len(node)
                result.draft.chances[j] = 1.0 - 1e-3 * j   # the tree of 16 nodes is the first 15 paths
                if depth <= len(future):  # the true token on `path`, a wrong one elsewhere
                    right = node == path[:depth]
                    result.draft.tokens[j] = future[depth - 1] if right else (future[depth - 1] + 1) % 1000
        return results

    monkeypatch.setattr(engine.runner, "execute", with_oracle_drafts)
    engine.add_request("oracle", ids, params)
    seq, out, steps = engine.sequences["oracle"], [], 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            out += o.token_ids
        steps += 1
        if not seq.is_finished:
            check_cache_against_prefill(engine, seq)
    assert out == expected
    assert steps <= 2 + len(expected) / (len(path) + 1), "oracle drafts should be accepted several at a time"


def check_cache_against_prefill(engine, seq):
    from models.attention import KVCache, TorchAttention, build_metadata
    config = engine.model.config
    n = seq.num_cached_tokens
    blocks = (n + 15) // 16
    fresh = KVCache(config.num_hidden_layers, blocks, 16, config.num_key_value_heads, config.head_dim,
                    engine.kv_cache.k.dtype)
    metadata = build_metadata([n], [n], [list(range(blocks))], 16, num_prefills=1)
    with torch.inference_mode():
        engine.model(torch.tensor(seq.token_ids[:n]), torch.arange(n), TorchAttention(metadata, fresh))
    size = engine.kv_cache.block_size
    slots = torch.tensor([seq.block_table[i // size] * size + i % size for i in range(n)])
    ours = engine.kv_cache.k.view(config.num_hidden_layers, -1, config.num_key_value_heads, config.head_dim)[:, slots]
    theirs = fresh.k.view(config.num_hidden_layers, -1, config.num_key_value_heads, config.head_dim)[:, :n]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_abort_frees_blocks_at_once(engine):
    free = engine.block_manager.num_free_blocks
    engine.add_request("doomed", chat_ids(engine.tokenizer, PROMPTS[0]), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free_blocks < free
    engine.abort_request("doomed")
    assert engine.block_manager.num_free_blocks == free
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_sampling_with_speculation_is_seeded_and_stops(engine):
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=11)
    ids = chat_ids(engine.tokenizer, PROMPTS[5])
    first = run_to_completion(engine, {"a": (ids, params)})["a"]
    second = run_to_completion(engine, {"b": (ids, params)})["b"]
    assert first == second and 0 < len(first) <= 8


def test_sampled_steps_judge_their_probes_on_the_base_models_distribution(engine, monkeypatch):
    """At temperature > 0 a step tests the tokens the policy's pending shadow trees and lookup
    chains expect next (its probes) by typical acceptance: on the base model's distribution
    after the text so far, the one a tree's root child would be judged on."""
    from models.attention import KVCache, TorchAttention, build_metadata
    from server.acceptance import typical_verdicts
    from server.sampler import probabilities
    execute, seen = engine.runner.execute, []

    def recording(batch):
        results = execute(batch)
        seen.extend((list(item.seq.token_ids), item.tree.probes, result.verdicts)
                    for item, result in results if result.verdicts)
        return results

    monkeypatch.setattr(engine.runner, "execute", recording)
    params = SamplingParams(max_tokens=32, temperature=0.7, ignore_eos=True)
    torch.manual_seed(0)   # unseeded requests draw from torch's global generator
    run_to_completion(engine, {"probed": (chat_ids(engine.tokenizer, PROMPTS[21]), params)})
    assert seen
    config = engine.model.config
    for ids, probes, verdicts in seen[:4]:
        n, blocks = len(ids), (len(ids) + 15) // 16
        cache = KVCache(config.num_hidden_layers, blocks, 16, config.num_key_value_heads, config.head_dim,
                        engine.kv_cache.k.dtype)
        metadata = build_metadata([n], [n], [list(range(blocks))], 16, num_prefills=1)
        with torch.inference_mode():
            logits, _ = engine.model(torch.tensor(ids), torch.arange(n), TorchAttention(metadata, cache),
                                     torch.tensor([n - 1]))
        assert typical_verdicts(probabilities(logits, params)[0], params, probes) == verdicts


def test_plain_sampled_steps_draw_each_sequence_its_own_token(engine, references, monkeypatch):
    """Unseeded plain steps that share sampling parameters draw their tokens in one call: at
    a temperature near 0 each sequence must still follow its own distribution (its greedy text)."""
    import server.model_runner
    prompts = PROMPTS[:4]
    plain = SamplingParams(max_tokens=24, temperature=1e-3, speculate=False)
    monkeypatch.setattr(server.model_runner, "SAMPLING_ROWS", 2)   # two calls of two rows
    outputs = run_to_completion(engine, {str(i): (chat_ids(engine.tokenizer, p), plain) for i, p in enumerate(prompts)})
    assert [outputs[str(i)] for i in range(len(prompts))] == [references(p) for p in prompts]
    # beside trees of the same parameters (their rows come first or between in one call)
    monkeypatch.undo()
    engine.set_tree_budget(4)
    try:
        mixed = [plain if i % 2 else SamplingParams(max_tokens=24, temperature=1e-3) for i in range(len(prompts))]
        outputs = run_to_completion(engine, {str(i): (chat_ids(engine.tokenizer, p), params)
                                             for i, (p, params) in enumerate(zip(prompts, mixed))})
    finally:
        engine.set_tree_budget(None)
    assert [outputs[str(i)] for i in range(len(prompts))] == [references(p) for p in prompts]


def test_stop_string_ends_the_request_without_leaking(engine, references):
    ids = chat_ids(engine.tokenizer, PROMPTS[15])
    full = engine.tokenizer.decode(references(PROMPTS[15]))
    stop = full[10:14]
    engine.add_request("s", ids, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))
    text, reasons = "", []
    while engine.has_unfinished_requests():
        for o in engine.step():
            text += o.text
            reasons.append(o.finish_reason)
    assert text == full[: full.index(stop)] and reasons[-1] == "stop"


def test_prompt_too_long_is_refused_with_numbers(engine):
    with pytest.raises(ValueError, match=r"maximum context length is \d+ tokens"):
        engine.add_request("long", [1] * engine.max_model_len, SamplingParams(max_tokens=1))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_same_seed_same_text_whatever_the_load(engine, top_p):
    """Beside greedy requests and beside unseeded ones that share its sampling parameters
    (the runner computes their distributions in one call with it)."""
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=top_p, seed=42, ignore_eos=True)
    ids = chat_ids(engine.tokenizer, PROMPTS[7])
    alone = run_to_completion(engine, {"alone": (ids, params)})["alone"]
    busy = {f"other{i}": (chat_ids(engine.tokenizer, p), SamplingParams(max_tokens=10, temperature=0.0))
            for i, p in enumerate(PROMPTS[:3])}
    busy.update({f"sampled{i}": (chat_ids(engine.tokenizer, p), SamplingParams(max_tokens=10, temperature=1.0,
                                                                                top_p=top_p))
                 for i, p in enumerate(PROMPTS[3:6])})
    busy["seeded"] = (ids, params)
    assert run_to_completion(engine, busy)["seeded"] == alone


@pytest.fixture(scope="module")
def shipped_engine():
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25))


def test_shipped_heads_greedy_equals_plain_greedy_in_a_batch(shipped_engine, references):
    assert shipped_engine.heads is not None
    check_exact(shipped_engine, references, PROMPTS[11:15])
    assert shipped_engine.scheduler.running == []


@pytest.mark.slow
def test_shipped_heads_exact_on_22_prompts_batch_1_and_8(shipped_engine, references):
    check_exact_alone_and_in_batches(shipped_engine, references)


@pytest.fixture(scope="module")
def int8_engine():
    from models.packed_linear import int8_supported
    if not int8_supported():
        pytest.skip("the 8-bit integer kernels need AVX-512 VNNI")
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25, int8_linear=True))


@pytest.fixture(scope="module")
def int8_references(int8_engine):
    """Plain greedy decoding with the int8 engine's own model and attention: the outputs it must equal."""
    cache = {}

    def get(prompt, params=GREEDY):
        if (prompt, params) not in cache:
            cache[prompt, params] = reference(int8_engine, chat_ids(int8_engine.tokenizer, prompt), params,
                                              same_attention=True)
        return cache[prompt, params]
    return get


def test_int8_linear_speculation_equals_its_own_plain_greedy(int8_engine, int8_references):
    """--int8-linear rounds activations, so its text may part from the fp32 path's, but
    speculation over it stays exact: alone and in a batch of different lengths."""
    assert int8_engine.model.lm_head.layout == "8-bit x 8-bit integers"
    check_exact(int8_engine, int8_references, PROMPTS[15:16])
    check_exact(int8_engine, int8_references, PROMPTS[3:11])


@pytest.mark.slow
def test_int8_linear_exact_on_22_prompts_batch_1_and_8(int8_engine, int8_references):
    check_exact_alone_and_in_batches(int8_engine, int8_references)


def test_fp16_kv_cache_holds_twice_the_tokens_and_speculation_stays_exact(engine):
    """--kv-cache-dtype float16 beside the fp32 model: twice the blocks for the same memory;
    its rounding of keys and values may part its text from the fp32 cache's, but speculation
    over it equals plain greedy decoding over it, alone and in a batch of different lengths."""
    fp16 = LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.25, kv_cache_dtype="float16"))
    assert fp16.kv_cache.k.dtype == torch.float16 and fp16.kv_cache.dtype == torch.float32
    assert fp16.kv_cache.num_blocks == 2 * engine.kv_cache.num_blocks

    def references(prompt, params):
        return reference(fp16, chat_ids(fp16.tokenizer, prompt), params, same_attention=True)
    check_exact(fp16, references, PROMPTS[15:16])
    check_exact(fp16, references, PROMPTS[3:11])
