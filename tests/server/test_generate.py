"""Reference generation: stopping rules and seeded sampling on the real model."""
from server.generate import generate
from server.sampling_params import SamplingParams


def test_stops_at_max_tokens_and_at_eos(model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    out = generate(model, ids, SamplingParams(max_tokens=200, temperature=0.0), tokenizer.eos_token_ids)
    assert out[-1] in tokenizer.eos_token_ids and len(out) < 200
    assert len(generate(model, ids, SamplingParams(max_tokens=5, temperature=0.0))) == 5


def test_seeded_sampling_is_reproducible(model, tokenizer):
    ids = tokenizer.encode("The weather today is")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    assert generate(model, ids, params) == generate(model, ids, params)


def test_top_k_one_is_greedy(model, tokenizer):
    ids = tokenizer.encode("A list of colors: red,")
    greedy = generate(model, ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    top1 = generate(model, ids, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3, ignore_eos=True))
    assert greedy == top1
