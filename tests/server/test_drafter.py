"""Drafts laid out on the tree: independent heads read once per sequence, chained heads
extend every path from its parent; both checked against a node-by-node construction, tokens
and chances (the product of the heads' probabilities along the path)."""
import pytest
import torch

from models.heads import HeadsConfig, MedusaHeads
from server.drafter import Drafter
from server.tree import expand_tree

ACCURACIES = [[0.6, 0.1, 0.05, 0.03], [0.4, 0.1, 0.05], [0.3, 0.08], [0.2, 0.06]]
PATHS = tuple(expand_tree(ACCURACIES, 64))


def make_heads(model, chained: bool) -> MedusaHeads:
    torch.manual_seed(7)
    heads = MedusaHeads(HeadsConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                                    num_layers=1, token_input=True, chained=chained))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    heads.set_draft_vocab(torch.arange(0, model.config.vocab_size, 5))
    return heads.eval()


def embed(model, token: int) -> torch.Tensor:
    return model.model.embed_tokens(torch.tensor([token]))


@torch.inference_mode()
def test_chained_drafts_extend_each_path_from_its_parent(model):
    heads = make_heads(model, chained=True)
    drafter = Drafter(heads, model, PATHS)
    hidden = torch.randn(3, model.config.hidden_size)
    roots, sizes = [11, 22, 33], [16, 1, 6]
    drafts = drafter.draft(hidden, roots, sizes)
    assert [len(d) for d in drafts] == [15, 0, 5]
    for row, (root, size) in enumerate(zip(roots, sizes)):
        for j, path in enumerate(PATHS[: size - 1]):
            state, token, chance = hidden[row:row + 1], root, 1.0
            for depth in range(len(path)):   # walk the path, feeding each node's own token
                state = heads.step(depth, state, embed(model, token))
                probs, ids = heads.top_guesses(state, model.lm_head, drafter.top_k)
                token, chance = int(ids[0, path[depth]]), chance * float(probs[0, path[depth]])
            assert drafts[row].tokens[j] == token, (row, path)
            assert drafts[row].chances[j] == pytest.approx(chance, rel=1e-4), (row, path)


@torch.inference_mode()
def test_independent_drafts_fill_the_whole_tree_from_one_call(model):
    heads = make_heads(model, chained=False)
    drafter = Drafter(heads, model, PATHS)
    hidden = torch.randn(2, model.config.hidden_size)
    drafts = drafter.draft(hidden, [5, 6], [4, 0])
    embeds = model.model.embed_tokens(torch.tensor([5, 6]))
    probs, ids = heads.top_guesses(heads(hidden, embeds), model.lm_head, drafter.top_k)
    for row in range(2):
        assert len(drafts[row]) == len(PATHS)
        for j, path in enumerate(PATHS):
            assert drafts[row].tokens[j] == int(ids[row, len(path) - 1, path[-1]])
            chance = 1.0
            for depth, rank in enumerate(path):
                chance *= float(probs[row, depth, rank])
            assert drafts[row].chances[j] == pytest.approx(chance, rel=1e-4)
        # a child is never likelier than its parent: every best-first prefix is a tree
        for j, path in enumerate(PATHS):
            if len(path) > 1:
                assert drafts[row].chances[j] <= drafts[row].chances[PATHS.index(path[:-1])]


@torch.inference_mode()
def test_drafts_padded_to_a_graph_bucket_equal_unpadded_ones(model):
    """Rows padded to a power of two on static buffers (what a CUDA graph replays; eagerly
    here, capture=False): the same drafts as the unpadded call, after a bigger batch has left
    stale rows in the buffers."""
    heads = make_heads(model, chained=False)
    plain = Drafter(heads, model, PATHS)
    padded = Drafter(heads, model, PATHS, graph_rows=8, capture=False)
    assert padded.graphs is not None and padded.graphs.graphs == {}
    torch.manual_seed(3)
    for rows in (7, 3, 1, 8):
        hidden = torch.randn(rows, model.config.hidden_size)
        roots = list(range(100, 100 + rows))
        expected, got = plain.draft(hidden, roots, [8] * rows), padded.draft(hidden, roots, [8] * rows)
        assert [d.tokens for d in got] == [d.tokens for d in expected]
        for d, e in zip(got, expected):
            assert d.chances == pytest.approx(e.chances, rel=1e-4)   # a padded batch rounds differently
    # more rows than the biggest bucket: the eager call
    assert len(padded.draft(torch.randn(9, model.config.hidden_size), [1] * 9, [8] * 9)) == 9
    # chained heads draft depth by depth on the host: no graphs
    assert Drafter(make_heads(model, chained=True), model, PATHS, graph_rows=8, capture=False).graphs is None


def test_chained_heads_need_token_input_and_the_shared_unembedding():
    with pytest.raises(ValueError):
        HeadsConfig(token_input=False, chained=True)
    with pytest.raises(ValueError):
        HeadsConfig(token_input=True, shared_unembedding=False, chained=True)


@torch.inference_mode()
def test_packed_heads_draft_through_one_cpu_call_with_the_same_drafts(model):
    from models.cpu_kernels import cpu_kernels
    from models.packed_linear import pack_linears
    if cpu_kernels() is None:
        pytest.skip("needs Gorgon's CPU kernels")
    heads = make_heads(model, chained=False)
    pack_linears(heads)
    fused, python = Drafter(heads, model, PATHS), Drafter(heads, model, PATHS)
    python._cpu_heads = (heads.draft_unembedding(model.lm_head)[0], None)   # as where CpuHeads cannot run
    assert fused._cpu_draft() is not None and python._cpu_draft() is None
    for rows in (1, 3):
        hidden = torch.randn(rows, model.config.hidden_size)
        roots = list(range(5, 5 + rows))
        assert fused.draft(hidden, roots, [8] * rows) == python.draft(hidden, roots, [8] * rows)
