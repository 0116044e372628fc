"""Tree steps padded to a CUDA graph's bucket (server/step_graphs.py) against the unpadded step.

On the CPU the padded static-buffer step runs eagerly in Triton's interpreter (capture=False):
the same buffers, padding and launches a captured graph replays on a GPU. On a GPU the graphs
are captured and replayed.
"""
import random

import pytest
import torch

from batches import DEVICE, random_tree_masks
from kernels.backend import TritonAttention
from models.attention import KVCache
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from server.model_runner import ModelRunner
from server.step_graphs import StepGraphs, bucket, prefill_buckets, warm_up_buckets

BLOCK = 8
CONFIG = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def runner(model, graphs: bool) -> ModelRunner:
    cache = KVCache(CONFIG.num_hidden_layers, 64, BLOCK, CONFIG.num_key_value_heads, CONFIG.head_dim, torch.float32,
                    DEVICE)
    step_graphs = StepGraphs(model, cache, TritonAttention, max_seqs=8, max_tokens=64, max_blocks_per_seq=16,
                             capture=DEVICE == "cuda") if graphs else None
    return ModelRunner(model, None, cache, TritonAttention, (), step_graphs)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


@pytest.mark.parametrize("max_seqs, max_tree, max_tokens", [(5, 4, 12), (8, 64, 64), (64, 64, 512), (3, 1, 2)])
def test_warm_up_buckets_are_exactly_the_reachable_ones(max_seqs, max_tree, max_tokens):
    """Brute force: n sequences, the longest tree m nodes, the rest any size from 1 to m."""
    reachable = {(bucket(n), bucket(m), bucket(tokens))
                 for n in range(1, max_seqs + 1) for m in range(1, max_tree + 1)
                 for tokens in range(n - 1 + m, min(n * m, max_tokens) + 1)}
    buckets = warm_up_buckets(max_seqs, max_tree, max_tokens)
    assert len(buckets) == len(set(buckets)) and set(buckets) == reachable


@pytest.mark.parametrize("steps", [[[1, 5, 3], [2], [1, 1, 1]], [[7, 1], [4, 4, 4]]])
def test_padded_tree_steps_match_unpadded_ones(steps):
    """Prompts (padded to prompt buckets in the graphed runner), then tree steps of different
    buckets one after another (a smaller step after a bigger one must read nothing stale);
    logits and caches agree."""
    torch.manual_seed(0)
    rng = random.Random(len(steps))
    model = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    eager, graphed = runner(model, False), runner(model, True)
    graphed.kv_cache.k.copy_(eager.kv_cache.k)
    graphed.kv_cache.v.copy_(eager.kv_cache.v)
    prompt_lens = [rng.randint(3, 30) for _ in range(3)]
    tables = [list(range(16 * b, 16 * b + 8)) for b in range(3)]
    with torch.inference_mode():
        for b, n in enumerate(prompt_lens):  # prompts: eager, and padded to a prompt bucket
            ids = [rng.randrange(64) for _ in range(n)]
            expected = eager.forward(ids, list(range(n)), [n], [n], [tables[b]], 1, None, [n - 1])[0]
            torch.testing.assert_close(graphed.forward(ids, list(range(n)), [n], [n], [tables[b]], 1, None, [n - 1])[0],
                                       expected, atol=2e-5, rtol=2e-5)
        for query_lens in steps:
            seqs = range(len(query_lens))
            masks = [random_tree_masks(q, rng) for q in query_lens]
            ids = [rng.randrange(64) for _ in range(sum(query_lens))]
            positions = [prompt_lens[b] + bin(m).count("1") - 1 for b in seqs for m in masks[b]]
            seq_lens = [prompt_lens[b] + query_lens[b] for b in seqs]
            step = (ids, positions, query_lens, seq_lens, [tables[b] for b in seqs], 0, masks, list(range(len(ids))))
            expected_logits, expected_hidden = eager.forward(*step)
            logits, hidden = graphed.forward(*step)
            assert hidden.shape == expected_hidden.shape
            torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(graphed.kv_cache.k, eager.kv_cache.k, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(graphed.kv_cache.v, eager.kv_cache.v, atol=2e-5, rtol=2e-5)
        if DEVICE == "cuda":
            tree_buckets = {(bucket(len(q)), bucket(max(q)), bucket(sum(q))) for q in steps}
            prompt_buckets = {(1, 0, bucket(n)) for n in prompt_lens}
            assert set(graphed.graphs.graphs) == tree_buckets | prompt_buckets


@torch.inference_mode()
def test_steps_mixing_prompt_chunks_and_trees_match_unpadded_ones():
    """A step holding prompt chunks (one mid-prompt, one that completes its prompt) and trees
    replays the chunks' graph, then the trees': logits and caches equal the eager step's."""
    torch.manual_seed(1)
    rng = random.Random(5)
    model = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    eager, graphed = runner(model, False), runner(model, True)
    tables = [list(range(16 * b, 16 * b + 8)) for b in range(4)]
    prompt_lens = [rng.randint(3, 20) for _ in range(2)]
    for b, n in enumerate(prompt_lens):
        ids = [rng.randrange(64) for _ in range(n)]
        for r in (eager, graphed):
            r.forward(ids, list(range(n)), [n], [n], [tables[b]], 1, None, [n - 1])
    # sequences 2 and 3: prompt chunks of 9 and 13 tokens (3's first chunk, 2's whole prompt);
    # 0 and 1: trees of 3 and 1 nodes
    chunk_lens, tree_lens = [9, 13], [3, 1]
    masks = [random_tree_masks(q, rng) for q in tree_lens]
    ids = [rng.randrange(64) for _ in range(sum(chunk_lens) + sum(tree_lens))]
    positions = list(range(9)) + list(range(13)) + [
        prompt_lens[b] + bin(m).count("1") - 1 for b in range(2) for m in masks[b]]
    seq_lens = [9, 13] + [prompt_lens[b] + tree_lens[b] for b in range(2)]
    logits_rows = [8] + list(range(22, 22 + sum(tree_lens)))   # 2's prompt completes; 3's does not
    step = (ids, positions, chunk_lens + tree_lens, seq_lens, [tables[2], tables[3], tables[0], tables[1]], 2, masks,
            logits_rows)
    expected_logits, expected_hidden = eager.forward(*step)
    logits, hidden = graphed.forward(*step)
    torch.testing.assert_close(hidden, expected_hidden, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(graphed.kv_cache.k, eager.kv_cache.k, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(graphed.kv_cache.v, eager.kv_cache.v, atol=2e-5, rtol=2e-5)
    if DEVICE == "cuda":
        assert {(2, 0, 32), (2, 4, 4)} <= set(graphed.graphs.graphs)


@pytest.mark.parametrize("max_seqs, max_tokens", [(5, 12), (64, 512), (3, 2)])
def test_prefill_buckets_are_exactly_the_reachable_ones(max_seqs, max_tokens):
    reachable = {(bucket(n), 0, bucket(tokens)) for n in range(1, max_seqs + 1) for tokens in range(n, max_tokens + 1)}
    buckets = prefill_buckets(max_seqs, max_tokens)
    assert len(buckets) == len(set(buckets)) and set(buckets) == reachable


@torch.inference_mode()
def test_draft_graphs_give_the_eager_drafts_and_follow_new_weights():
    """The heads' guesses from draft graphs (captured on a GPU; padded and eager on the CPU)
    equal the eager drafter's for every row count; a new draft vocabulary (new tensors the
    graphs would read at stale addresses) gets graphs captured again."""
    from models.heads import HeadsConfig, MedusaHeads
    from server.drafter import Drafter
    from server.tree import expand_tree

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval().to(DEVICE)
    heads = MedusaHeads(HeadsConfig(hidden_size=CONFIG.hidden_size, vocab_size=CONFIG.vocab_size, num_heads=3,
                                    num_layers=1, token_input=True)).eval().to(DEVICE)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    heads.set_draft_vocab(torch.arange(0, CONFIG.vocab_size, 2))
    paths = tuple(expand_tree([[0.6, 0.2, 0.1], [0.4, 0.1], [0.3]], 16))
    eager, graphed = Drafter(heads, model, paths), Drafter(heads, model, paths, graph_rows=8)
    assert graphed.graphs is not None
    if DEVICE == "cuda":
        assert sorted(graphed.graphs.graphs) == [1, 2, 4, 8] and None not in graphed.graphs.graphs.values()

    def check(rows):
        hidden = torch.randn(rows, CONFIG.hidden_size, device=DEVICE)
        roots = [int(t) for t in torch.randint(0, CONFIG.vocab_size, (rows,))]
        for got, expected in zip(graphed.draft(hidden, roots, [16] * rows), eager.draft(hidden, roots, [16] * rows)):
            assert got.tokens == expected.tokens
            assert got.chances == pytest.approx(expected.chances, rel=1e-4, abs=1e-7)

    for rows in (8, 3, 1, 5):
        check(rows)
    heads.set_draft_vocab(torch.arange(1, CONFIG.vocab_size, 3))
    check(4)
    if DEVICE == "cuda":
        assert None not in graphed.graphs.graphs.values()
