"""Log-probabilities of generated tokens: a token kept from a tree gets plain decoding's numbers."""
import pytest
import torch

from engine_helpers import chat_ids, reference
from models.attention import TorchAttention, build_metadata
from server import metrics
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling_params import SamplingParams

VERSE = "one two three four five six seven eight nine ten. "


@pytest.fixture(scope="module")
def tree_engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, tree_budget=8), random_heads)


def run(engine, requests):
    """{name: (ids, params)} -> {name: (token ids, logprobs)}, all at once."""
    for name, (ids, params) in requests.items():
        engine.add_request(name, ids, params)
    outputs = {name: ([], []) for name in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens, logprobs = outputs[out.request_id]
            if out.logprobs is not None:
                assert len(logprobs) == len(tokens), "an earlier output had tokens without logprobs"
                assert len(out.logprobs) <= len(out.token_ids)
                logprobs.extend(out.logprobs)
            tokens.extend(out.token_ids)
    return outputs


def forward_logprobs(engine, ids, tokens):
    """Each token's log-probability after ids and the tokens before it, from one forward of
    the whole text through PyTorch's attention."""
    text = torch.tensor(ids + tokens[:-1])
    metadata = build_metadata([len(text)], [len(text)], [list(range(-(-len(text) // 16)))], 16, 1, None, device="cpu")
    with torch.inference_mode():
        logits, _ = engine.model(text, torch.arange(len(text)), TorchAttention(metadata, engine.kv_cache),
                                 torch.arange(len(ids) - 1, len(text)))
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]


def test_speculative_logprobs_equal_plain_decodings_to_the_bit(tree_engine):
    ids = chat_ids(tree_engine.tokenizer, "Repeat this line five times: " + VERSE * 3)
    other = chat_ids(tree_engine.tokenizer, "What is the capital of Japan?")
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3)
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3, speculate=False)
    accepted = metrics.spec_accepted_tokens._value.get()
    outputs = run(tree_engine, {"spec": (ids, greedy), "plain": (ids, plain),   # one step, other top counts
                                "other": (other, SamplingParams(max_tokens=20, temperature=0.0, logprobs=1))})
    assert metrics.spec_accepted_tokens._value.get() - accepted >= 8, "the test meant trees to keep tokens"
    tokens, logprobs = outputs["spec"]
    assert tokens == outputs["plain"][0] == reference(tree_engine, ids, greedy)
    assert logprobs == outputs["plain"][1] and len(logprobs) == 40
    for token, entry in zip(tokens, logprobs):   # greedy: the token is the likeliest, alternatives best first
        assert len(entry.top) == 3 and entry.top[0] == (token, entry.logprob)
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    expected = forward_logprobs(tree_engine, ids, tokens)
    assert torch.allclose(torch.tensor([e.logprob for e in logprobs]), expected, atol=1e-3)
    other_tokens, other_logprobs = outputs["other"]
    assert all(len(entry.top) == 1 for entry in other_logprobs)
    assert len(other_logprobs) == len(other_tokens) - (other_tokens[-1] in tree_engine.tokenizer.eos_token_ids)


@pytest.mark.parametrize("acceptance, seed", [("typical", 3), ("typical", None), ("rejection", 5)])
def test_sampled_tokens_get_the_models_own_logprobs(tree_engine, acceptance, seed):
    """Sampled tokens (trees under either rule, unseeded plain draws) report the model's
    distribution before temperature; a request without logprobs gets none."""
    ids = chat_ids(tree_engine.tokenizer, "Write a haiku about rain.")
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=seed, logprobs=0, acceptance=acceptance,
                            ignore_eos=True, speculate=seed is not None)
    outputs = run(tree_engine, {"sampled": (ids, params), "twin": (ids, params),
                                "without": (ids, SamplingParams(max_tokens=12, temperature=0.0))})
    tokens, logprobs = outputs["sampled"]
    assert len(logprobs) == len(tokens) == 12 and all(e.top == () for e in logprobs)
    expected = forward_logprobs(tree_engine, ids, tokens)
    assert torch.allclose(torch.tensor([e.logprob for e in logprobs]), expected, atol=1e-3)
    assert outputs["without"][1] == []


def test_no_logprobs_past_a_stop_string(tree_engine):
    ids = chat_ids(tree_engine.tokenizer, "Repeat this line five times: " + VERSE * 3)
    full = run(tree_engine, {"full": (ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                          logprobs=0))})["full"]
    text = tree_engine.tokenizer.decode(full[0])
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = run(tree_engine, {"cut": (ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                        logprobs=0, stop=(stop,)))})["cut"]
    kept = text[:text.index(stop)]
    needed = next(k for k in range(len(full[0]) + 1) if len(tree_engine.tokenizer.decode(full[0][:k])) >= len(kept))
    assert cut[1] == full[1][:needed] and len(cut[0]) >= needed


def test_logprobs_out_of_range_are_refused():
    for count in (-1, 21):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=count)


@pytest.mark.parametrize("chunk", [256, 16], ids=["one chunk", "chunks of 16"])
def test_a_prompts_logprobs_equal_a_full_forwards_and_max_tokens_0_scores_only(random_heads, chunk):
    """Prompt log-probabilities (what an evaluation harness scores): each prompt token's under
    the tokens before it, the first one none, computed whole though the prefix cache holds the
    prompt's blocks, the same in one chunk or many; max_tokens 0 generates nothing."""
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=chunk, max_tree_nodes=16, kv_cache_memory_gb=0.1),
                       random_heads)
    ids = chat_ids(engine.tokenizer, "Repeat this line five times: " + VERSE * 2)
    run(engine, {"warm": (ids, SamplingParams(max_tokens=2, temperature=0.0))})   # its blocks are cached now
    score = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=2)
    both = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=0, logprobs=0)
    for name, params in (("score", score), ("both", both)):
        engine.add_request(name, ids, params)
    firsts, finished = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
            if out.is_finished:
                finished[out.request_id] = out
    expected = forward_logprobs(engine, ids[:1], ids[1:])
    for name in ("score", "both"):
        prompt = firsts[name].prompt_logprobs
        assert len(prompt) == len(ids) and prompt[0] is None
        assert torch.allclose(torch.tensor([e.logprob for e in prompt[1:]]), expected, atol=1e-3)
    assert all(len(e.top) == 2 for e in firsts["score"].prompt_logprobs[1:])
    assert finished["score"].token_ids == [] and finished["score"].finish_reason == "length"
    assert finished["score"].num_output_tokens == 0 and firsts["both"].logprobs is not None
    assert finished["both"].prompt_logprobs is None or finished["both"] is firsts["both"]
