"""Head training on cached hidden states: targets, reduced vocabulary, loss goes down,
resuming from a checkpoint continues the same run."""
import pytest
import torch

from models.head_trainer import HeadTrainer, TrainConfig, evaluate, head_targets, reduced_vocabulary

HIDDEN, VOCAB = 32, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine their barriers cost 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_head_targets_look_ahead_within_each_answer():
    tokens = torch.tensor([10, 11, 12, 13, 20, 21])
    offsets = torch.tensor([0, 4, 6])
    targets = head_targets(tokens, offsets, num_heads=2)
    assert targets.tolist() == [[11, 12], [12, 13], [13, -1], [-1, -1], [21, -1], [-1, -1]]


def test_reduced_vocabulary_covers_the_frequent_targets():
    targets = torch.tensor([[1, 1], [1, 2], [2, 3], [-1, 1]])
    assert reduced_vocabulary(targets, 10, coverage=0.99, max_vocab=100).tolist() == [1, 2, 3]
    assert reduced_vocabulary(targets, 10, coverage=0.5, max_vocab=100).tolist() == [1]
    assert reduced_vocabulary(targets, 10, coverage=1.0, max_vocab=2).tolist() == [1, 2]


def synthetic_data(n=256, seed=0):
    """Hidden states from which the future tokens are learnable: a fixed permutation chain."""
    generator = torch.Generator().manual_seed(seed)
    lm_head = 2 * torch.linalg.qr(torch.randn(HIDDEN, VOCAB, generator=generator))[0].T  # [V, H]
    tokens = torch.randint(0, VOCAB, (n,), generator=generator)
    hidden = (lm_head[tokens] + 0.05 * torch.randn(n, HIDDEN, generator=generator)).half()
    # the "answer" is a fixed permutation chain, so future tokens follow from the current one
    chain = torch.randperm(VOCAB, generator=generator)
    targets = torch.stack([tokens := chain[tokens] for _ in range(3)], dim=1)
    return lm_head, hidden, targets


def loss_of(trainer, hidden, targets) -> float:
    with torch.no_grad():
        return trainer.loss(hidden.float(), targets)[0].item()


def make_trainer(lm_head, num_rows, shared=True, token_input=False, epochs=8):
    config = TrainConfig(num_heads=3, num_layers=1, shared_unembedding=shared, epochs=epochs, batch_size=32,
                         lr=3e-2, coverage=1.0, max_vocab=VOCAB, token_input=token_input, seed=1)
    return HeadTrainer(config, lm_head, torch.arange(VOCAB), num_rows,
                       base_embeddings=lm_head if token_input else None)


def test_tiny_training_lowers_the_loss_and_learns():
    lm_head, hidden, targets = synthetic_data()
    trainer = make_trainer(lm_head, len(hidden))
    before = loss_of(trainer, hidden, targets)
    trainer.train(hidden, targets)
    after = loss_of(trainer, hidden, targets)
    assert after < 0.5 * before
    linear = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    linear.weight.data.copy_(lm_head)
    accuracy = evaluate(trainer.heads, linear, hidden, targets)
    assert accuracy[0][0] > 0.5 and len(accuracy) == 3 and len(accuracy[0]) == 10


def test_own_unembedding_heads_train_too():
    lm_head, hidden, targets = synthetic_data()
    trainer = make_trainer(lm_head, len(hidden), shared=False)
    before = loss_of(trainer, hidden, targets)
    trainer.train(hidden, targets, max_steps=16)
    assert loss_of(trainer, hidden, targets) < before


def test_training_resumes_from_its_checkpoint(tmp_path):
    lm_head, hidden, targets = synthetic_data()
    straight = make_trainer(lm_head, len(hidden))
    straight.train(hidden, targets)

    first = make_trainer(lm_head, len(hidden))
    saved = []
    first.train(hidden, targets, save=lambda t: torch.save(t.state_dict(), tmp_path / "c.pt") or saved.append(t.step),
                save_every=5, max_steps=13)
    assert first.step == 13 and saved == [5, 10, 13]
    resumed = make_trainer(lm_head, len(hidden))
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert resumed.step == 13
    resumed.train(hidden, targets)
    assert resumed.step == straight.step == straight.total_steps
    for a, b in zip(straight.heads.parameters(), resumed.heads.parameters()):
        torch.testing.assert_close(a, b)


def test_resuming_with_other_settings_is_refused(tmp_path):
    lm_head, hidden, targets = synthetic_data(n=128)
    trainer = make_trainer(lm_head, len(hidden))
    state = trainer.state_dict()
    state["config"]["lr"] = 1.0
    try:
        trainer.load_state_dict(state)
    except ValueError as e:
        assert "same settings" in str(e)
    else:
        raise AssertionError("a checkpoint with other settings was accepted")


def test_token_input_heads_learn_what_the_hidden_state_does_not_say():
    """Hidden states that are pure noise, futures that follow from the next token only: plain
    heads stay near chance, heads that read the next token's embedding learn the chain."""
    generator = torch.Generator().manual_seed(3)
    lm_head = 2 * torch.linalg.qr(torch.randn(HIDDEN, VOCAB, generator=generator))[0].T
    n = 512
    hidden = torch.randn(n, HIDDEN, generator=generator).half()
    next_tokens = torch.randint(0, VOCAB, (n,), generator=generator)
    chain = torch.randperm(VOCAB, generator=generator)
    tokens = next_tokens
    targets = torch.stack([tokens := chain[tokens] for _ in range(3)], dim=1)
    linear = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    linear.weight.data.copy_(lm_head)
    scores = {}
    for token_input in (False, True):
        trainer = make_trainer(lm_head, n, token_input=token_input, epochs=12)
        trainer.train(hidden, targets, next_tokens if token_input else None)
        embeds = lm_head[next_tokens] if token_input else None
        scores[token_input] = evaluate(trainer.heads, linear, hidden.float(), targets, embeds)[0][0]
    assert scores[True] > 0.8 and scores[False] < 0.3


def test_token_input_heads_need_the_next_tokens():
    lm_head, hidden, targets = synthetic_data(n=64)
    with pytest.raises(ValueError, match="embeddings"):
        HeadTrainer(TrainConfig(num_heads=3, token_input=True, coverage=1.0), lm_head, torch.arange(VOCAB), 64)
    trainer = make_trainer(lm_head, 64, token_input=True)
    with pytest.raises(ValueError, match="next tokens"):
        trainer.loss(hidden.float(), targets)


def test_detached_chain_keeps_each_heads_loss_on_that_head():
    """Chained heads: with detach_chain, head 2's loss does not train head 1 (whose output it
    reads); without it, it does."""
    from models.heads import HeadsConfig, MedusaHeads
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(num_heads=2, num_layers=1, hidden_size=8, vocab_size=16, token_input=True,
                                    chained=True))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    hidden, nxt, path = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 1, 8)
    for detach, reaches_head_1 in ((True, False), (False, True)):
        heads.zero_grad(set_to_none=True)
        heads(hidden, nxt, path, detach_chain=detach)[:, 1].pow(2).sum().backward()
        grad = heads.blocks[0][0].linear.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == reaches_head_1
        assert heads.blocks[1][0].linear.weight.grad.abs().sum() > 0
