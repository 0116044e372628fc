"""Our Llama code against transformers' LlamaForCausalLM on the same weights."""
import json

import pytest
import torch

from models.attention import KVCache, TorchAttention, build_metadata
from models.fetch import default_gguf_path
from models.loader import load_model
from server.generate import generate
from server.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a dragon who",
    "Question: what is 17 times 23? Answer:",
]


def full_logits(model, ids):
    config = model.config
    blocks = (len(ids) + 15) // 16
    cache = KVCache(config.num_hidden_layers, blocks, 16, config.num_key_value_heads, config.head_dim,
                    model.lm_head.weight.dtype)
    metadata = build_metadata([len(ids)], [len(ids)], [list(range(blocks))], 16, num_prefills=1)
    logits, hidden = model(torch.tensor(ids), torch.arange(len(ids)), TorchAttention(metadata, cache))
    assert hidden.shape == (len(ids), config.hidden_size)
    return logits


@pytest.fixture(scope="module")
def hf_model(model_dir):
    transformers = pytest.importorskip("transformers")
    gguf = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@torch.inference_mode()
def test_logits_match_transformers_gguf(model, tokenizer, hf_model):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = full_logits(model, ids)
        ref = hf_model(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-3, prompt


@torch.inference_mode()
def test_64_greedy_tokens_match_transformers(model, tokenizer, hf_model):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a hash map is."}])
    ours = generate(model, ids, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert ours == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@torch.inference_mode()
def test_random_hf_checkpoint_matches_transformers(tmp_path, architecture):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=5000.0, tie_word_embeddings=False)
    if architecture == "LlamaForCausalLM":
        hf_config = transformers.LlamaConfig(attention_bias=True, **common)
        hf = transformers.LlamaForCausalLM(hf_config)
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # random biases, so a dropped bias cannot go unnoticed
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    assert any(tmp_path.glob("*.safetensors"))
    ours = load_model(tmp_path, "float32")
    assert ours.config.attention_bias and ours.config.num_key_value_heads == 2
    ids = torch.randint(0, 300, (37,)).tolist()
    ref = hf(torch.tensor([ids])).logits[0]
    assert (full_logits(ours, ids) - ref).abs().max().item() <= 1e-4


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path)


def test_missing_model_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_corrupt_weights_are_refused(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model_runs_close_to_fp32(model_dir, model, tokenizer, dtype):
    half = load_model(model_dir, dtype)
    ids = tokenizer.encode(PROMPTS[0])
    with torch.inference_mode():
        a, b = full_logits(model, ids)[-1], full_logits(half, ids)[-1].float()
    assert a.argmax() == b.argmax()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
