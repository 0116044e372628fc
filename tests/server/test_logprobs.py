"""Log-probabilities of generated tokens: a token kept from a tree gets plain decoding's numbers."""
import pytest
import torch

from engine_helpers import chat_ids, reference
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
            outputs[out.request_id][0].extend(out.token_ids)
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.token_ids)
                outputs[out.request_id][1].extend(out.logprobs)
    return outputs


def test_speculative_logprobs_equal_plain_decodings_to_the_bit(tree_engine):
    ids = chat_ids(tree_engine.tokenizer, "Repeat this line five times: " + VERSE * 3)
    other = chat_ids(tree_engine.tokenizer, "What is the capital of Japan?")
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3)
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=3, speculate=False)
    accepted = metrics.spec_accepted_tokens._value.get()
    outputs = run(tree_engine, {"spec": (ids, greedy), "plain": (ids, plain), "other": (other, greedy)})
    assert metrics.spec_accepted_tokens._value.get() - accepted >= 8, "the test meant trees to keep tokens"
    tokens, logprobs = outputs["spec"]
    assert tokens == outputs["plain"][0] == reference(tree_engine, ids, greedy)
    assert logprobs == outputs["plain"][1] and len(logprobs) == 40
    for token, entry in zip(tokens, logprobs):   # greedy: the token is the likeliest, alternatives best first
        assert len(entry.top) == 3 and entry.top[0] == (token, entry.logprob)
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    # against one forward of the whole text through PyTorch's attention: the same distributions
    model = tree_engine.model
    text = torch.tensor(ids + tokens[:-1])
    from models.attention import build_metadata
    from models.attention import TorchAttention
    metadata = build_metadata([len(text)], [len(text)], [list(range(-(-len(text) // 16)))], 16, 1, None, device="cpu")
    with torch.inference_mode():
        logits, _ = model(text, torch.arange(len(text)), TorchAttention(metadata, tree_engine.kv_cache),
                          torch.arange(len(ids) - 1, len(text)))
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert torch.allclose(torch.tensor([e.logprob for e in logprobs]), expected, atol=1e-3)
    assert all(len(entry.top) == 3 for entry in outputs["other"][1])


def test_sampled_tokens_get_the_models_own_logprobs_and_no_request_pays_for_others(tree_engine):
    ids = chat_ids(tree_engine.tokenizer, "Write a haiku about rain.")
    outputs = run(tree_engine, {"sampled": (ids, SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=0)),
                                "without": (ids, SamplingParams(max_tokens=12, temperature=0.0))})
    tokens, logprobs = outputs["sampled"]
    assert len(logprobs) == len(tokens) and all(e.top == () and e.logprob <= 0.0 for e in logprobs)
    assert outputs["without"][1] == []


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
