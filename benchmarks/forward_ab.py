"""The model's forward at a git revision against the working tree's, in one process.

    python -m benchmarks.forward_ab [--rev HEAD~1] [--sizes 1,4,8] [--context 300] [--rounds 15]

Loads `models/llama.py` and `models/attention.py` as they were at `--rev` beside today's,
builds both models from the default checkpoint (fp32, oneDNN-packed, as the server runs
them), and times one forward of n new tokens over `--context` cached ones (a chain with
logits on every row, as a tree step has) for each, interleaved round by round with the
order flipped every round, so a slow spell of a shared machine hits both. Prints the
largest logit difference between the two (0 when a change only moved work around) and
each size's best and median time.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import models.attention as attention
from models.fetch import ensure_default_model
from models.llama import RotaryEmbedding
from models.loader import load_model, read_config, read_state_dict, stack_projections
from models.packed_linear import pack_linears


def module_at(rev: str, path: str, name: str, folder: Path):
    """Import `path` as it was at git revision `rev` under the module name `name`."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def model_at(llama, model_dir: Path):
    """The checkpoint in an older revision's model class (Hugging Face names, or stacked ones)."""
    config = read_config(model_dir)
    with torch.device("meta"):
        model = llama.LlamaForCausalLM(config)
    state = {k: v.float() for k, v in read_state_dict(model_dir).items() if not k.endswith("inv_freq")}
    state.pop("lm_head.weight", None)
    if not set(state) <= {name for name, _ in model.named_parameters()}:
        stack_projections(state)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config)
    model = model.eval().requires_grad_(False)
    pack_linears(model, keep_weights=("lm_head",))
    return model


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD~1")
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = ensure_default_model()
    with tempfile.TemporaryDirectory() as folder:
        old_llama = module_at(args.rev, "models/llama.py", "gorgon_ab_llama", Path(folder))
        old_attention = module_at(args.rev, "models/attention.py", "gorgon_ab_attention", Path(folder))
    variants = {args.rev: (model_at(old_llama, model_dir), old_attention),
                "working tree": (load_model(model_dir, "float32"), attention)}
    config = next(iter(variants.values()))[0].config
    block_size = 16
    num_blocks = -(-(args.context + max(sizes)) // block_size)
    table = list(range(num_blocks))
    caches = {}
    for name, (model, backend) in variants.items():
        caches[name] = backend.KVCache(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                                       config.head_dim, torch.float32)
        prefill = backend.build_metadata([args.context], [args.context], [table], block_size, 1)
        model(torch.arange(args.context) % 1000, torch.arange(args.context),
              backend.TorchAttention(prefill, caches[name]))
    times = {(name, n): [] for name in variants for n in sizes}
    logits = {}
    for r in range(args.rounds):
        for n in sizes:
            for name, (model, backend) in list(variants.items())[:: 1 if r % 2 else -1]:
                masks = [[(1 << (i + 1)) - 1 for i in range(n)]]
                metadata = backend.build_metadata([n], [args.context + n], [table], block_size, 0, masks)
                started = time.perf_counter()
                logits[name, n], _ = model(torch.arange(n) + 500, torch.arange(args.context, args.context + n),
                                           backend.TorchAttention(metadata, caches[name]), torch.arange(n))
                times[name, n].append(time.perf_counter() - started)
    old, new = variants
    print(f"# {date.today()} {platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, context {args.context}, {args.rounds} interleaved rounds")
    print(f"| tokens | largest logit difference | {old}: best / median ms | working tree: best / median ms "
          "| median ratio |")
    print("|---|---|---|---|---|")
    for n in sizes:
        a, b = times[old, n], times[new, n]
        diff = (logits[old, n] - logits[new, n]).abs().max().item()
        print(f"| {n} | {diff:.2g} | {min(a) * 1e3:.1f} / {statistics.median(a) * 1e3:.1f} | "
              f"{min(b) * 1e3:.1f} / {statistics.median(b) * 1e3:.1f} | "
              f"{statistics.median(b) / statistics.median(a):.3f} |")


if __name__ == "__main__":
    main()
