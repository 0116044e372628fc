"""logit_bias, min_tokens and the penalties: each row changed from its own context, so that
speculation with them stays exactly plain decoding."""
import random
from collections import Counter

import pytest
import torch

from engine_helpers import chat_ids, reference, run_to_completion
from server import metrics
from server.config import EngineConfig
from server.engine import LLMEngine
from server.logits_processor import Job, TokenCounts, changes_logits, process_logits
from server.sampling_params import SamplingParams

VOCAB = 40
STOP = frozenset({0, 7})


def brute_force(row: torch.Tensor, prompt: list[int], context: list[int], params: SamplingParams) -> torch.Tensor:
    """One row changed token by token, straight from the definitions."""
    out, counts = row.clone(), Counter(context)
    for token, bias in params.logit_bias:
        out[token] += bias
    if len(context) < params.min_tokens:
        for token in STOP:
            out[token] = float("-inf")
    for token in range(len(out)):
        value = out[token]
        if token in counts or token in prompt:
            value = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        out[token] = value - params.frequency_penalty * counts[token] - params.presence_penalty * (counts[token] > 0)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_every_row_is_changed_as_its_own_context_says(seed):
    rng = random.Random(seed)
    params = SamplingParams(
        max_tokens=64, presence_penalty=rng.choice([0.0, 0.7, -0.4]), frequency_penalty=rng.choice([0.0, 0.5, 1.5]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]), min_tokens=rng.choice([0, 5, 9]),
        logit_bias=tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(VOCAB), rng.randint(0, 3))))
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 10))]
    # a tree: node 0 the root, each later node below an earlier one
    parents, tokens, paths = [-1], [None], [()]
    for node in range(1, rng.randint(1, 9)):
        parents.append(rng.randrange(node))
        tokens.append(rng.randrange(VOCAB))
        paths.append(paths[parents[node]] + (tokens[node],))
    logits = torch.randn(len(paths) + 3, VOCAB) * 5
    rows = rng.sample(range(len(logits)), len(paths))
    counts = TokenCounts()
    counts.update(prompt, prompt + output[:3], VOCAB, "cpu")   # counted as they come
    counts.update(prompt, prompt + output, VOCAB, "cpu")
    expected = logits.clone()
    for row, path in zip(rows, paths):
        expected[row] = brute_force(logits[row], prompt, output + list(path), params)
    process_logits(logits, [Job(rows, paths, params, counts, STOP)])
    assert torch.allclose(logits, expected, rtol=1e-6, atol=1e-5) and torch.equal(logits.isinf(), expected.isinf())


def test_untouched_rows_and_a_plain_row_equal_the_same_row_in_a_tree():
    """A plain step's row and a tree's root row with the same context get the same bits,
    whatever tokens the tree's other rows add to the columns touched."""
    params = SamplingParams(max_tokens=8, frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.1)
    counts = TokenCounts()
    counts.update([1, 2, 3], [1, 2, 3, 4, 4, 5], VOCAB, "cpu")
    base = torch.randn(3, VOCAB)
    plain, tree = base.clone(), base.clone()
    process_logits(plain, [Job([0], [()], params, counts, STOP)])
    process_logits(tree, [Job([0, 1], [(), (9,)], params, counts, STOP)])
    assert torch.equal(plain[0], tree[0]) and torch.equal(tree[2], base[2])
    assert not changes_logits(SamplingParams()) and changes_logits(SamplingParams(min_tokens=1))


def test_requests_changed_together_get_the_bits_they_get_alone():
    """A step changes all its requests' rows at once: each row as it would be alone, whatever
    the others ask (a penalty of 0, or 1 for repetition, changes no bit of theirs)."""
    rng = random.Random(7)
    jobs = []
    for k, params in enumerate([SamplingParams(max_tokens=64, frequency_penalty=0.8),
                                SamplingParams(max_tokens=64, repetition_penalty=1.4, presence_penalty=-0.3),
                                SamplingParams(max_tokens=64, logit_bias=((3, 2.0),), min_tokens=20)]):
        counts = TokenCounts()
        prompt = [rng.randrange(VOCAB) for _ in range(6)]
        counts.update(prompt, prompt + [rng.randrange(VOCAB) for _ in range(8)], VOCAB, "cpu")
        paths = [(), (rng.randrange(VOCAB),)]
        paths.append(paths[1] + (rng.randrange(VOCAB),))
        jobs.append(Job([3 * k, 3 * k + 1, 3 * k + 2], paths, params, counts, STOP))
    logits = torch.randn(9, VOCAB) * 4
    together = logits.clone()
    process_logits(together, jobs)
    for job in jobs:
        alone = logits.clone()
        process_logits(alone, [job])
        assert torch.equal(together[job.rows], alone[job.rows])


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0), ("min_tokens", 9),
                                          ("logit_bias", ((5, 101.0),)), ("logit_bias", ((-1, 1.0),)),
                                          ("logit_bias", ((5, 1.0), (5, 2.0)))])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(max_tokens=8, **{field: value})


@pytest.fixture(scope="module")
def tree_engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, tree_budget=8), random_heads)


VERSE = "Repeat this line five times: " + "one two three four five six seven eight nine ten. " * 2
LAUGH = "Laugh: ha ha ha ha ha ha ha ha"
CHANGES = [(LAUGH, dict(frequency_penalty=0.4, presence_penalty=0.3)), (LAUGH, dict(frequency_penalty=1.0)),
           (VERSE, dict(repetition_penalty=1.05)), (VERSE, dict(frequency_penalty=-0.5, logit_bias=((11, 3.0), (30, -2.0)))),
           (VERSE, dict(min_tokens=20, ignore_eos=False))]


@pytest.mark.parametrize("prompt, change", CHANGES)
def test_speculation_with_changed_logits_is_plain_decoding(tree_engine, prompt, change):
    """Greedy trees verified with penalties, biases and min_tokens keep exactly what plain
    decoding with them gives (which the reference loop computes row by row), and keep some
    drafted tokens. The laughs' trees keep repeats of drafted tokens only where the
    penalties of the path's own tokens allow (a tree that scored its rows from the output
    alone parts from plain decoding); min_tokens falls inside a tree."""
    ids = chat_ids(tree_engine.tokenizer, prompt)
    change = {"ignore_eos": True, **change}
    spec = SamplingParams(max_tokens=40, temperature=0.0, **change)
    accepted = metrics.spec_accepted_tokens._value.get()
    outputs = run_to_completion(tree_engine, {"spec": (ids, spec),
                                              "plain": (ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                                            speculate=False, **change))})
    assert metrics.spec_accepted_tokens._value.get() - accepted >= 3, "the test meant trees to keep tokens"
    expected = reference(tree_engine, ids, spec)
    assert outputs["spec"] == outputs["plain"] == expected
    unchanged = run_to_completion(tree_engine, {"none": (ids, SamplingParams(max_tokens=40, temperature=0.0,
                                                                             ignore_eos=change["ignore_eos"]))})
    assert expected != unchanged["none"], "the change changed nothing in this test"


def test_token_ids_out_of_the_vocabulary_are_refused(tree_engine):
    vocab = tree_engine.model.config.vocab_size
    for params in (SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(vocab,)),
                   SamplingParams(max_tokens=4, logit_bias=((vocab + 5, 1.0),))):
        with pytest.raises(ValueError, match="must be in"):
            tree_engine.add_request("bad", [1, 2, 3], params)
    assert not tree_engine.has_unfinished_requests()


def test_logit_bias_and_min_tokens_do_what_they_say(tree_engine):
    tokenizer = tree_engine.tokenizer
    ids = chat_ids(tokenizer, "What is the capital of Japan?")
    free = run_to_completion(tree_engine, {"free": (ids, SamplingParams(max_tokens=64, temperature=0.0))})["free"]
    assert free[-1] in tokenizer.eos_token_ids and len(free) < 30
    forced = tokenizer.encode(" banana")[0]
    outputs = run_to_completion(tree_engine, {
        "banned": (ids, SamplingParams(max_tokens=8, temperature=0.0, logit_bias=((free[0], -100.0),))),
        "forced": (ids, SamplingParams(max_tokens=4, temperature=0.7, seed=3, logit_bias=((forced, 100.0),))),
        "long": (ids, SamplingParams(max_tokens=64, temperature=0.0, min_tokens=30))})
    assert outputs["banned"][0] != free[0]
    assert outputs["forced"] == [forced] * 4
    long = outputs["long"]
    assert len(long) >= 30 and not set(long[:30]) & tokenizer.eos_token_ids
    assert long[:len(free) - 1] == free[:-1]   # the same text until the EOS it may not pick yet
