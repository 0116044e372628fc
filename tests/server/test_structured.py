"""Structured outputs: every row masked by its grammar after its own path, so that trees keep
exactly plain decoding's tokens under the grammar, and what comes out follows it."""
import json
import random
import re

import pytest
import torch

from engine_helpers import chat_ids, run_to_completion
from server import metrics
from server.config import EngineConfig
from server.engine import LLMEngine
from server.generate import generate
from server.sampling_params import SamplingParams
from server.structured import grammar_from

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "hobbies": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.fixture(scope="module")
def tree_engine(random_heads):
    return LLMEngine(EngineConfig(max_num_batched_tokens=256, kv_cache_memory_gb=0.1, tree_budget=8), random_heads)


def allowed(engine, grammar, tokens):
    """The tokens a fresh matcher lets follow `tokens` (llguidance's own bitmask)."""
    matcher = engine.structured.grammar(grammar).matcher
    assert matcher.consume_tokens(tokens)
    bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    unpacked = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)
    return set(unpacked[:engine.model.config.vocab_size].nonzero().view(-1).tolist())


@pytest.mark.parametrize("seed", range(4))
def test_each_row_is_masked_after_its_own_path(tree_engine, seed):
    """Rows of a random tree over the tokens of a phone number: a row whose path the grammar
    allows keeps exactly the tokens that may follow it; a row past a forbidden token is left
    alone (its node can never be kept); the matcher ends where it started."""
    rng = random.Random(seed)
    tokenizer, grammar = tree_engine.tokenizer, grammar_from("regex", PHONE)
    output = tokenizer.encode("(555) 12")
    candidates = sorted({t for text in ["3", "4", "34", "-", "1", "x", " ", "3-"] for t in tokenizer.encode(text)})
    paths = [()]
    for _ in range(rng.randint(3, 9)):
        paths.append(rng.choice(paths) + (rng.choice(candidates),))
    logits = torch.randn(len(paths) + 2, tree_engine.model.config.vocab_size)
    rows = rng.sample(range(len(logits)), len(paths))
    state = tree_engine.structured.grammar(grammar)
    for token in output:
        assert not state.advance(token)
    before = logits.clone()
    state.mask(logits, rows, paths)
    probe = tree_engine.structured.grammar(grammar).matcher
    probe.consume_tokens(output)
    for row, path in zip(rows, paths):
        if probe.validate_tokens(list(path)) == len(path):
            expected = allowed(tree_engine, grammar, output + list(path))
            assert set(logits[row].isfinite().nonzero().view(-1).tolist()) == expected
            assert torch.equal(logits[row][list(expected)], before[row][list(expected)])
        else:
            assert torch.equal(logits[row], before[row])
    assert state.matcher.validate_tokens(tokenizer.encode("3-4567")) == len(tokenizer.encode("3-4567"))


def test_constraints_compile_or_say_why(tree_engine):
    check = tree_engine.structured.check
    assert check(grammar_from("choice", ["yes", "no", 'say "hi"\n'])) is None
    assert check(grammar_from("json_schema", json.dumps(PERSON))) is None
    assert check(grammar_from("grammar", 'start: "a"+ "b"')) is None
    assert "regex" in check(grammar_from("regex", "((")).lower()
    with pytest.raises(ValueError):
        grammar_from("choice", [])
    with pytest.raises(ValueError):
        grammar_from("json_schema", "[1, 2]")
    with pytest.raises(ValueError, match="grammar"):
        tree_engine.structured.grammar(grammar_from("grammar", "start: ("))
    tokenizer = tree_engine.tokenizer
    for text, ok in [('{\n  "a": 1,\n  "b": [1, 2]\n}', True), ('{"a":1,"b":[]}', True), ('{ "a" : 1 }', True),
                     ('{\n\n  "a": 1}', False), ('{\n' + ' ' * 40 + '"a": 1}', False),   # no runaway whitespace
                     ('{' + ' ' * 40 + '"a": 1}', False), ('{' + ' ' * 32 + '"a": 1}', True)]:
        ids = tokenizer.encode(text)
        matcher = tree_engine.structured.grammar(grammar_from("json_object", None)).matcher
        assert (matcher.validate_tokens(ids) == len(ids)) == ok, text
    compact = grammar_from("json_schema", {"type": "object", "x-guidance": {"whitespace_flexible": False}})
    for text, ok in [('{"a":1}', True), ('{"a": 1}', False)]:   # a schema's own whitespace options hold
        ids = tokenizer.encode(text)
        assert (tree_engine.structured.grammar(compact).matcher.validate_tokens(ids) == len(ids)) == ok, text


CASES = [("Describe a person as JSON.", "json_schema", PERSON),
         ("Tell me about Paris.", "json_object", None),
         ("What is the phone number of the library?", "regex", PHONE),
         ("Is the sky blue? Answer yes or no.", "choice", ["yes", "no"])]


def follows(kind, value, text):
    if kind == "regex":
        return re.fullmatch(value, text) is not None
    if kind == "choice":
        return text in value
    parsed = json.loads(text)
    if kind == "json_object":
        return isinstance(parsed, dict)
    return set(parsed) == {"name", "age", "hobbies"} and isinstance(parsed["age"], int)


def test_speculation_under_a_grammar_is_plain_decoding_and_follows_it(tree_engine):
    """Greedy trees under each kind of constraint keep exactly what plain decoding under it
    gives (and the reference loop); the texts follow their constraints and end when the
    grammar is complete."""
    requests, grammars = {}, {}
    for i, (text, kind, value) in enumerate(CASES):
        grammars[i] = grammar_from(kind, value)
        ids = chat_ids(tree_engine.tokenizer, text)
        max_tokens = 40 if kind == "json_object" else 120   # the open object may go on
        requests[f"spec{i}"] = (ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=grammars[i]))
        requests[f"plain{i}"] = (ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=grammars[i],
                                                     speculate=False))
    accepted = metrics.spec_accepted_tokens._value.get()
    outputs = run_to_completion(tree_engine, requests)
    assert metrics.spec_accepted_tokens._value.get() - accepted >= 10, "the test meant trees to keep tokens"
    for i, (text, kind, value) in enumerate(CASES):
        ids, params = requests[f"spec{i}"]
        expected = generate(tree_engine.model, ids, params, tree_engine.tokenizer.eos_token_ids,
                            grammar=tree_engine.structured.grammar(grammars[i]))
        assert outputs[f"spec{i}"] == outputs[f"plain{i}"] == expected, kind
        if kind != "json_object":
            assert len(expected) < params.max_tokens and follows(kind, value, tree_engine.tokenizer.decode(expected))


def test_sampled_choices_follow_the_schema(tree_engine):
    """Typical acceptance at temperature 1 keeps only what the grammar allows: every seeded
    choice parses and holds the schema's keys (bounded, so that each ends within max_tokens)."""
    ids = chat_ids(tree_engine.tokenizer, "Describe a person as JSON.")
    short = {"type": "string", "maxLength": 12}
    bounded = {**PERSON, "properties": {"name": short, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                        "hobbies": {"type": "array", "items": short, "maxItems": 3}}}
    grammar = grammar_from("json_schema", bounded)
    requests = {f"s{seed}": (ids, SamplingParams(max_tokens=160, temperature=1.0, seed=seed, grammar=grammar))
                for seed in range(4)}
    for name, tokens in run_to_completion(tree_engine, requests).items():
        assert follows("json_schema", PERSON, tree_engine.tokenizer.decode(tokens)), name


def test_a_grammar_with_min_tokens_logprobs_or_a_failure_ends_only_its_request(tree_engine):
    """A grammar complete before min_tokens may still end (its rows are never left empty,
    also when a tree path completes it, sampled or greedy); logprobs of tokens the grammar
    forbids read -9999, not -inf; a grammar that fails mid-way finishes its request with
    "error" and its reason. Beside them, an ordinary request runs on unharmed."""
    tokenizer = tree_engine.tokenizer
    phone, ids = grammar_from("regex", PHONE), chat_ids(tokenizer, "What is the phone number of the library?")
    bystander = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    requests = {"bystander": (ids, bystander),
                "greedy": (ids, SamplingParams(max_tokens=40, temperature=0.0, min_tokens=40, grammar=phone)),
                "empty": (ids, SamplingParams(max_tokens=8, temperature=0.0, min_tokens=5,
                                              grammar=grammar_from("regex", ""))),
                "choice": (ids, SamplingParams(max_tokens=8, temperature=0.0, logprobs=5,
                                               grammar=grammar_from("choice", ["yes", "no"]))),
                "endless": (ids, SamplingParams(max_tokens=64, temperature=0.0,
                                                grammar=grammar_from("grammar", 'start: x\nx: "a" x')))}
    requests.update({f"sampled{seed}": (ids, SamplingParams(max_tokens=40, temperature=1.0, seed=seed, min_tokens=40,
                                                            grammar=phone)) for seed in range(3)})
    for name, (prompt, params) in requests.items():
        tree_engine.add_request(name, prompt, params)
    outputs = {name: [] for name in requests}
    while tree_engine.has_unfinished_requests():
        for out in tree_engine.step():
            outputs[out.request_id].append(out)
    finish = {name: outs[-1].finish_reason for name, outs in outputs.items()}
    tokens = {name: [t for out in outs for t in out.token_ids] for name, outs in outputs.items()}
    assert finish["bystander"] == "length" and tokens["bystander"] == reference_tokens(tree_engine, ids, bystander)
    for name in ["greedy", "sampled0", "sampled1", "sampled2"]:
        text = tokenizer.decode(tokens[name])
        assert finish[name] == "stop" and re.fullmatch(PHONE, text), (name, text)
    assert finish["empty"] == "stop" and tokens["empty"] == [next(iter(tokenizer.eos_token_ids))]
    logprobs = [entry for out in outputs["choice"] for entry in out.logprobs or ()]
    assert logprobs and all(value >= -9999.0 for entry in logprobs for _, value in entry.top)
    assert min(value for entry in logprobs for _, value in entry.top) == -9999.0
    assert finish["endless"] == "error" and outputs["endless"][-1].error


def reference_tokens(engine, ids, params):
    return generate(engine.model, ids, params, engine.tokenizer.eos_token_ids)


def test_tokens_the_grammar_forces_are_drafted_and_kept(tree_engine):
    """A schema's key is forced once its quote opens: the policy drafts it as a chain, and
    trees keep it, where random heads and the prompt's text could not guess it."""
    key = "the_quick_brown_fox_jumps_over_the_lazy_dog"
    schema = {"type": "object", "properties": {key: {"type": "integer"}}, "required": [key],
              "additionalProperties": False}
    ids = chat_ids(tree_engine.tokenizer, "Give me a number as JSON.")
    params = SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar_from("json_schema", schema))
    accepted = metrics.spec_accepted_tokens._value.get()
    tokens = run_to_completion(tree_engine, {"forced": (ids, params)})["forced"]
    assert key in tree_engine.tokenizer.decode(tokens)
    assert metrics.spec_accepted_tokens._value.get() - accepted >= len(tree_engine.tokenizer.encode(key)) - 2
    assert tokens == generate(tree_engine.model, ids, params, tree_engine.tokenizer.eos_token_ids,
                              grammar=tree_engine.structured.grammar(params.grammar))
