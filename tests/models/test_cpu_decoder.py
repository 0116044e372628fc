"""The C++ decoder stack (models/cpu_decoder.py) gives the bits the Python layers give."""
import random

import pytest
import torch

from models.attention import KVCache, build_metadata
from models.cpu_attention import BatchInvariantCpuAttention, CpuAttention
from models.config import ModelConfig
from models.cpu_decoder import build_cpu_heads
from models.cpu_kernels import cpu_kernels
from models.heads import HeadsConfig, MedusaHeads
from models.llama import LlamaForCausalLM
from models.loader import load_model
from models.packed_linear import PackedLinear, int8_supported, pack_linears, round_to_q8_0

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the C++ decoder needs Gorgon's CPU kernels")

BLOCK = 16


def random_tree(nodes: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(ancestor masks, depths) of a random tree in topological order."""
    masks, depths = [], []
    for i in range(nodes):
        parent = rng.randrange(i) if i else None
        masks.append((masks[parent] if i else 0) | (1 << i))
        depths.append(depths[parent] + 1 if i else 0)
    return masks, depths


def step(model, cache: KVCache, histories: list[int], trees: list[int], attention_cls, rng: random.Random,
         prompt: tuple[int, int] | None = None):
    """One step of tree sequences over random cached histories (after a prompt chunk of
    prompt = (cached prefix, new tokens), if given) -> (logits, hidden, the step's attention)."""
    ids, positions, masks, tables, seq_lens, query_lens = [], [], [], [], [], []
    next_block = 0
    if prompt is not None:
        prefix, length = prompt
        blocks = -(-(prefix + length) // BLOCK)
        tables.append(list(range(blocks)))
        next_block = blocks
        ids += [rng.randrange(model.config.vocab_size) for _ in range(length)]
        positions += range(prefix, prefix + length)
        seq_lens.append(prefix + length)
        query_lens.append(length)
    for history, nodes in zip(histories, trees):
        tree_masks, depths = random_tree(nodes, rng)
        blocks = -(-(history + nodes) // BLOCK)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
        ids += [rng.randrange(model.config.vocab_size) for _ in range(nodes)]
        positions += [history + d for d in depths]
        masks.append(tree_masks)
        seq_lens.append(history + nodes)
        query_lens.append(nodes)
    metadata = build_metadata(query_lens, seq_lens, tables, BLOCK, int(prompt is not None), masks)
    attn = attention_cls(metadata, cache)
    logits, hidden = model(torch.tensor(ids), torch.tensor(positions), attn)
    return logits, hidden, attn


def filled_cache(model, storage_dtype=None) -> KVCache:
    config = model.config
    cache = KVCache(config.num_hidden_layers, 40, BLOCK, config.num_key_value_heads, config.head_dim,
                    torch.float32, storage_dtype=storage_dtype)
    gen = torch.Generator().manual_seed(0)
    for pool in (cache.k, cache.v):
        pool.copy_(torch.randn(pool.shape, generator=gen) * 2)
    return cache


def assert_decoder_matches_python_layers(model, trees, attention_cls=CpuAttention, storage_dtype=None, prompt=None):
    decoder = model.model.cpu_decoder
    assert decoder is not None
    histories = [37, 120, 5][: len(trees)]
    results = []
    for fused in (True, False):
        model.model.cpu_decoder = decoder if fused else None
        try:
            cache = filled_cache(model, storage_dtype)
            with torch.inference_mode():
                logits, hidden, attn = step(model, cache, histories, trees, attention_cls, random.Random(5), prompt)
            assert attn.decoder_arguments() is not None
            results.append((logits, hidden, cache))
        finally:
            model.model.cpu_decoder = decoder
    (logits, hidden, cache), (logits_py, hidden_py, cache_py) = results
    assert torch.equal(hidden, hidden_py)
    assert torch.equal(logits, logits_py)
    assert torch.equal(cache.k, cache_py.k) and torch.equal(cache.v, cache_py.v)   # the same keys written


@pytest.mark.parametrize("trees", [[1], [5], [1, 6, 12], [64]])
def test_exact_panels(model, trees):
    """The default load (exact 4/8-bit panels; past 8 rows the fp32 panels): a decode step, a
    small tree, a batch of trees beyond the quantized kernels' rows, a 64-node tree."""
    assert_decoder_matches_python_layers(model, trees)


def test_fp16_cache(model):
    assert_decoder_matches_python_layers(model, [1, 9], storage_dtype=torch.float16)


@pytest.fixture(scope="module")
def int8_model(model_dir):
    if not int8_supported():
        pytest.skip("8-bit integer linear layers need AVX-512 VNNI")
    return load_model(model_dir, "float32", int8=True)


@pytest.mark.parametrize("trees", [[1], [1, 6, 12]])
def test_int8_linear_layers(int8_model, trees):
    assert_decoder_matches_python_layers(int8_model, trees, BatchInvariantCpuAttention)


@pytest.mark.parametrize("prompt", [(0, 150), (40, 64), (17, 3)])
def test_int8_prompt_runs(int8_model, prompt):
    """--int8-linear's batch-invariant attention lays a prompt chunk (with or without a cached
    prefix, over several 64-row runs or in one) out as trees: the decoder runs it, to the bit."""
    assert_decoder_matches_python_layers(int8_model, [1, 6], BatchInvariantCpuAttention, prompt=prompt)


def test_biases_and_fp32_panels():
    """A model with q/k/v and output biases (Qwen2's and Llama's attention_bias) whose
    weights are no 4/8-bit values: fp32 panels, every bias through the C++ linear layers."""
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                         attention_out_bias=True)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    pack_linears(model, keep_weights=("lm_head",))
    model.model.refresh_cpu_decoder()
    assert {m.kernel_name for m in model.modules() if isinstance(m, PackedLinear)} == {"panel_linear"}
    assert all(layer.self_attn.qkv_proj.bias is not None and layer.self_attn.o_proj.bias is not None
               for layer in model.model.layers)
    assert_decoder_matches_python_layers(model, [1, 12])


def test_steps_with_prompt_chunks_stay_in_python(model):
    """A prompt chunk goes through SDPA, which the C++ decoder does not run: no arguments for it."""
    config = model.config
    cache = KVCache(config.num_hidden_layers, 8, BLOCK, config.num_key_value_heads, config.head_dim, torch.float32)
    metadata = build_metadata([7, 1], [7, 20], [[0], [1, 2]], BLOCK, 1, [[1]])
    assert CpuAttention(metadata, cache).decoder_arguments() is None
    # the same prompt laid out as a tree run (--int8-linear's batch-invariant attention) does go through it
    assert BatchInvariantCpuAttention(metadata, cache).decoder_arguments() is not None


def test_off_switch_and_unpacked_models(model_dir, monkeypatch):
    monkeypatch.setenv("GORGON_CPU_DECODER", "off")
    assert load_model(model_dir, "float32").model.cpu_decoder is None
    monkeypatch.setenv("GORGON_CPU_DECODER", "auto")
    assert load_model(model_dir, "float32", pack=False).model.cpu_decoder is None   # plain nn.Linear layers
    monkeypatch.setenv("GORGON_CPU_DECODER", "sometimes")
    with pytest.raises(ValueError, match="GORGON_CPU_DECODER"):
        load_model(model_dir, "float32")


def packed_heads(model, token_input: bool, int8: bool) -> MedusaHeads:
    """Random 2-layer heads with a draft vocabulary, packed as the server packs them."""
    torch.manual_seed(11)
    heads = MedusaHeads(HeadsConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                                    num_layers=2, token_input=token_input)).eval().requires_grad_(False)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    heads.set_draft_vocab(torch.arange(3, model.config.vocab_size, 7))
    if int8:
        for linear in (m for m in heads.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.copy_(round_to_q8_0(linear.weight))
    pack_linears(heads, int8=int8)
    return heads


@pytest.mark.parametrize("token_input", [True, False])
@pytest.mark.parametrize("int8", [False, True])
def test_heads_draft_in_one_call(request, model, token_input, int8):
    """CpuHeads gives MedusaHeads.top_guesses's probabilities and ids, bit for bit."""
    base = request.getfixturevalue("int8_model") if int8 else model
    heads = packed_heads(base, token_input, int8)
    built = build_cpu_heads(heads, base.lm_head)
    assert built is not None
    cpu_heads, vocab = built
    for rows in (1, 3, 0):
        hidden = torch.randn(rows, base.config.hidden_size) * 3
        embeds = base.model.embed_tokens(torch.randint(0, base.config.vocab_size, (rows, 2)))[:, 1] \
            if token_input else None   # (not contiguous)
        with torch.inference_mode():
            want_probs, want_ids = heads.top_guesses(heads(hidden, embeds), base.lm_head, 10)
            probs, indices = cpu_heads.top_guesses(hidden, embeds, 10)
        assert torch.equal(probs, want_probs) and torch.equal(vocab[indices], want_ids)


def test_heads_left_to_python(model, monkeypatch):
    assert build_cpu_heads(MedusaHeads(HeadsConfig(hidden_size=model.config.hidden_size,
                                                   vocab_size=model.config.vocab_size)), model.lm_head) is None
    monkeypatch.setenv("GORGON_CPU_DECODER", "off")
    assert build_cpu_heads(packed_heads(model, True, False), model.lm_head) is None
