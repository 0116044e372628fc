"""Drafts laid out on the tree: independent heads read once per sequence, chained heads
extend every path from its parent; both checked against a node-by-node construction."""
import pytest
import torch

from models.heads import HeadsConfig, MedusaHeads
from server.drafter import Drafter, node_tokens
from server.tree import expand_tree, tree_of

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
            state, token = hidden[row:row + 1], root
            for depth in range(len(path)):   # walk the path, feeding each node's own token
                state = heads.step(depth, state, embed(model, token))
                token = int(heads.top_tokens(state, model.lm_head, drafter.top_k)[0, path[depth]])
            assert drafts[row][j] == token, (row, path)


@torch.inference_mode()
def test_independent_drafts_fill_the_whole_tree_from_one_call(model):
    heads = make_heads(model, chained=False)
    drafter = Drafter(heads, model, PATHS)
    hidden = torch.randn(2, model.config.hidden_size)
    drafts = drafter.draft(hidden, [5, 6], [4, 0])
    guesses = heads.guesses(hidden, model.lm_head, drafter.top_k, model.model.embed_tokens(torch.tensor([5, 6])))
    for row in range(2):
        assert len(drafts[row]) == len(PATHS)
        for j, path in enumerate(PATHS):
            assert drafts[row][j] == int(guesses[row, len(path) - 1, path[-1]])


@pytest.mark.parametrize("num_nodes", [2, 5, 16])
def test_node_tokens_follow_the_tree_order(num_nodes):
    draft = [100 + j for j in range(num_nodes - 1)]
    tree = tree_of(PATHS, num_nodes)
    tokens = node_tokens(PATHS, 9, draft, num_nodes)
    assert tokens[0] == 9
    assert tokens[1:] == [100 + PATHS.index(path) for path in tree.paths[1:]]


def test_chained_heads_need_token_input_and_the_shared_unembedding():
    with pytest.raises(ValueError):
        HeadsConfig(token_input=False, chained=True)
    with pytest.raises(ValueError):
        HeadsConfig(token_input=True, shared_unembedding=False, chained=True)
