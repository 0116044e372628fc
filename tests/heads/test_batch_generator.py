"""The batched generator used for self-distillation data agrees with reference generation."""
import pytest
import torch

from models.batch_generator import generate_batch
from server.generate import generate
from server.sampling_params import SamplingParams


def test_batched_greedy_matches_reference_and_keeps_hidden_states(model, tokenizer):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}])
               for text in ("Name a color.", "What is two plus two?", "Say hello.")]
    done = {c.index: c for c in generate_batch(model, prompts, [0.0] * 3, 6, frozenset(), max_batch=2,
                                               hidden_dtype=torch.float32)}
    assert sorted(done) == [0, 1, 2]
    for i, prompt in enumerate(prompts):
        reference = generate(model, prompt, SamplingParams(max_tokens=6, temperature=0.0))
        assert done[i].output_ids == reference
        hidden = done[i].hidden_states()
        assert hidden.shape == (6, model.config.hidden_size)
        # hidden[j] is the state that produced token j
        assert model.compute_logits(hidden).argmax(-1).tolist() == done[i].output_ids


@pytest.mark.slow
def test_sampled_rows_are_reproducible_by_seed(model, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a word."}])
    runs = [[c.output_ids for c in generate_batch(model, [prompt, prompt], [1.0, 0.0], 5, frozenset(), seed=7)]
            for _ in range(2)]
    assert runs[0] == runs[1]
