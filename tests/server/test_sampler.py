"""Sampling: temperature, top-k, top-p, seeds, and parameter validation."""
import pytest
import torch

from server.sampler import greedy_tokens, make_generator, pick, probabilities
from server.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))


def test_greedy_is_one_hot_argmax():
    probs = probabilities(LOGITS, SamplingParams(temperature=0.0))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_top_k_keeps_the_k_best_renormalized():
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=2))[0]
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))[0]
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    probs = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=0.5))[0]
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


def nucleus_by_full_sort(logits, top_p):
    """The definition, over a full sort: the set of tokens each row's top-p keeps."""
    probs = logits.softmax(-1)
    ranked, order = torch.sort(probs, dim=-1, descending=True)
    drop = ranked.cumsum(-1) - ranked >= top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)


@pytest.mark.parametrize("scale", [8.0, 2.0, 0.01])   # peaked, spread, nearly flat (the nucleus runs past 256)
def test_top_p_over_a_large_vocabulary_keeps_what_a_full_sort_keeps(scale):
    torch.manual_seed(int(scale * 100))
    logits = torch.randn(5, 49152) * scale
    for top_p in (0.5, 0.9, 0.99):
        kept = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p)) > 0
        assert torch.equal(kept, nucleus_by_full_sort(logits, top_p)), top_p


def test_a_rows_top_p_distribution_does_not_depend_on_its_batch():
    """The runner computes every sampled sequence's distribution in one call: a row's bits
    must not change with the rows beside it (a seed gives the same text whatever the load)."""
    torch.manual_seed(3)
    peaked, flat = torch.randn(1, 49152) * 8.0, torch.randn(1, 49152) * 0.01   # flat: the search widens
    params = SamplingParams(temperature=0.7, top_p=0.9)
    alone = probabilities(peaked, params)
    assert torch.equal(probabilities(torch.cat([peaked, flat]), params)[:1], alone)


def test_temperature_sharpens():
    hot = probabilities(LOGITS, SamplingParams(temperature=2.0))[0]
    cold = probabilities(LOGITS, SamplingParams(temperature=0.5))[0]
    assert cold[0] > 0.5 > hot[0]


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(1, 1000)
    a = [int(pick(logits, params, g)) for g in [make_generator(params)] for _ in range(20)]
    b = [int(pick(logits, params, g)) for g in [make_generator(params)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_draws_follow_the_distribution():
    params = SamplingParams(temperature=1.0, seed=0)
    generator = make_generator(params)
    draws = torch.stack([pick(LOGITS, params, generator) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.15, 0.10]), atol=0.03)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(acceptance="maybe"), dict(stop=("",))])
def test_invalid_parameters_raise_value_error(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_draws_follow_the_distribution_and_skip_zero_probabilities():
    from server.sampler import sample
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])   # rows need not sum to 1
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs, generator) for _ in range(20_000)])
    assert draws[:, 1].eq(5).all()
    counts = torch.bincount(draws[:, 0], minlength=6).float() / len(draws)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)


@pytest.mark.parametrize("vocab", [1, 5, 8, 13, 49152, 49157])
def test_greedy_tokens_are_torch_argmax(vocab):
    """The CPU kernel's argmax is torch's: the first of tied maxima (in the vector part and in
    the tail), the first NaN of a row that has one, a row of -inf, signed zeros."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=gen)
    logits[1] = 0.5                                     # every entry tied
    logits[2, vocab // 3] = logits[2, -1] = 40.0        # a tie across the row, the last entry in the tail
    logits[3, vocab // 2] = float("nan")
    logits[3, -1] = float("nan")
    logits[4] = float("-inf")
    logits[5] = -0.0
    logits[5, vocab - 1] = 0.0
    logits[6, -1] = 99.0                                # the maximum alone in the tail
    assert greedy_tokens(logits) == logits.argmax(-1).tolist()
    assert greedy_tokens(logits[:, : max(1, vocab // 2)]) == logits[:, : max(1, vocab // 2)].argmax(-1).tolist()
