"""Multi-head checkpoints on disk: Gorgon's own format and the Medusa reference format.

Gorgon's format is a directory with `heads.safetensors` (MedusaHeads' parameter names, plus
an optional int32 `draft_vocab`: the token ids the heads guess among) and
`heads.json`: the base model's name and checksum, the head shape, the per-head top-k
accuracies measured on held-out data and the tuned tree (an expansion-ordered path list for
64 nodes whose every prefix is the best smaller tree, see server.tree.expand_tree).

Medusa's format is a directory with `config.json` (medusa_num_heads, medusa_num_layers,
base_model_name_or_path) and `medusa_lm_head.safetensors` or `medusa_lm_head.pt`, whose
keys are `{head}.{layer}.linear.{weight,bias}` for the residual blocks and
`{head}.{num_layers}.weight` for each head's own unembedding. Published configs are often
wrong about the head count, so the heads and layers are counted from the weight keys.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.heads import HeadsConfig, MedusaHeads

DEFAULT_HEADS_DIR = Path(__file__).parent / "heads_data" / "smollm2-135m-instruct"
GORGON_WEIGHTS, GORGON_CONFIG = "heads.safetensors", "heads.json"
DRAFT_VOCAB_KEY = "draft_vocab"  # int32 token ids in heads.safetensors (optional)
DATASTORE_FILE = "datastore.safetensors"  # the base model's answers to the training prompts (optional)
MEDUSA_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
FORMAT_NAME, FORMAT_VERSION = "gorgon-heads", 1
TREE_NODES = 64
TREE_BUDGETS = (4, 8, 16, 32, 64)
TOP_K = 10  # ranks per head kept in `accuracies`
# Prior for checkpoints that carry no measurements (Medusa format): the top-1 accuracies the
# Medusa paper reports for Vicuna-7B's heads, and each further rank `PRIOR_RANK_DECAY` times
# as likely as the one before (head 1 top-5 ~ 0.80, close to the paper's figure).
PRIOR_TOP1 = (0.56, 0.32, 0.20, 0.15)
PRIOR_RANK_DECAY = 0.3
_MEDUSA_KEY = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@dataclass(frozen=True)
class HeadCheckpoint:
    """Loaded heads plus what the engine needs to speculate with them."""
    heads: MedusaHeads
    tree_paths: tuple[tuple[int, ...], ...]  # expansion ordered: server.tree.tree_of(paths, n)
    accuracies: list[list[float]]            # [head][rank]: chance that this rank is right
    base_model: str = ""
    base_checksum: str = ""
    format: str = FORMAT_NAME
    datastore_path: Path | None = None       # server/datastore.py, when the checkpoint has one

    @property
    def num_heads(self) -> int:
        return self.heads.config.num_heads


def prior_accuracies(num_heads: int) -> list[list[float]]:
    """Medusa's published per-head top-1, extended past head 4 and down the ranks."""
    top1 = [PRIOR_TOP1[min(k, len(PRIOR_TOP1) - 1)] * (0.75 ** max(0, k - 3)) for k in range(num_heads)]
    return [[a * PRIOR_RANK_DECAY ** r for r in range(TOP_K)] for a in top1]


def tune_tree(accuracies: list[list[float]], num_nodes: int = TREE_NODES):
    """(expansion-ordered paths for num_nodes, {budget: expected accepted length})."""
    from server.tree import expand_tree, expected_accept_length

    paths = tuple(tuple(p) for p in expand_tree(accuracies, num_nodes))
    lengths = {b: expected_accept_length(list(paths[: b - 1]), accuracies) for b in TREE_BUDGETS if b <= num_nodes}
    return paths, lengths


# The config fields that define a model's computation, read through ModelConfig.from_hf (which
# fills defaults and reads transformers 5's rope_parameters). Only these enter the checksum:
# the rest, and how a converter happens to write a config, may change without changing the model.
CHECKSUM_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                   "rope_scaling", "tie_word_embeddings", "attention_bias", "attention_out_bias")


def model_checksum(model_dir: str | Path) -> str:
    """A cheap stable identity of a base model: sha256 over the config fields that define it
    and, per tensor (sorted by name), the name, dtype, shape and the bytes of its first row.
    Reads a few KB."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    digest.update(json.dumps({k: getattr(config, k) for k in CHECKSUM_FIELDS}, sort_keys=True).encode())
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                part = f.get_slice(name)
                shape = part.get_shape()
                digest.update(f"{name}:{part.get_dtype()}:{shape}".encode())
                first = part[:1] if shape else f.get_tensor(name)
                digest.update(first.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _check_shape(kind: str, hidden: int, vocab: int, base: ModelConfig, path: Path) -> None:
    if hidden != base.hidden_size or vocab != base.vocab_size:
        raise ValueError(
            f"the {kind} heads in {path} were made for hidden size {hidden} and vocabulary {vocab}, "
            f"but the base model has hidden size {base.hidden_size} and vocabulary {base.vocab_size}; "
            "use heads trained for this base model (python -m models.train_heads)")


def load_heads(path: str | Path, base_config: ModelConfig, dtype=torch.float32, device="cpu") -> HeadCheckpoint:
    """Load a Gorgon or Medusa head checkpoint for `base_config`; refuse mismatched heads."""
    path = Path(path)
    if (path / GORGON_CONFIG).exists():
        checkpoint = _load_gorgon(path, base_config)
    elif any((path / name).exists() for name in MEDUSA_WEIGHTS):
        checkpoint = _load_medusa(path, base_config)
    else:
        raise FileNotFoundError(f"no head checkpoint in {path}: expected {GORGON_CONFIG} + {GORGON_WEIGHTS} "
                                f"(Gorgon) or {' / '.join(MEDUSA_WEIGHTS)} (Medusa)")
    checkpoint.heads.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return checkpoint


def _load_gorgon(path: Path, base: ModelConfig) -> HeadCheckpoint:
    meta = json.loads((path / GORGON_CONFIG).read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path / GORGON_CONFIG} is not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    _check_shape("Gorgon", meta["hidden_size"], meta["vocab_size"], base, path)
    config = HeadsConfig(num_heads=meta["num_heads"], num_layers=meta["num_layers"],
                         hidden_size=meta["hidden_size"], vocab_size=meta["vocab_size"],
                         shared_unembedding=meta["shared_unembedding"], token_input=meta.get("token_input", False),
                         chained=meta.get("chained", False))
    heads = MedusaHeads(config)
    state = load_file(str(path / GORGON_WEIGHTS))
    draft_vocab = state.pop(DRAFT_VOCAB_KEY, None)
    try:
        heads.load_state_dict({k: v.float() for k, v in state.items()})
        heads.set_draft_vocab(draft_vocab)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path / GORGON_WEIGHTS} does not match {GORGON_CONFIG}: {e}") from e
    accuracies = meta.get("accuracies") or prior_accuracies(config.num_heads)
    paths = meta.get("tree", {}).get("paths")
    tree_paths = tuple(tuple(p) for p in paths) if paths else tune_tree(accuracies)[0]
    return HeadCheckpoint(heads, tree_paths, accuracies, meta.get("base_model", ""),
                          meta.get("base_checksum", ""), FORMAT_NAME,
                          path / DATASTORE_FILE if (path / DATASTORE_FILE).exists() else None)


def _read_medusa_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / MEDUSA_WEIGHTS[0]).exists():
        return load_file(str(path / MEDUSA_WEIGHTS[0]))
    state = torch.load(path / MEDUSA_WEIGHTS[1], map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path / MEDUSA_WEIGHTS[1]} is not a plain state dict of tensors")
    return state


def _load_medusa(path: Path, base: ModelConfig) -> HeadCheckpoint:
    state = _read_medusa_weights(path)
    parsed: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, value in state.items():
        match = _MEDUSA_KEY.match(key)
        if not match:
            raise ValueError(f"unexpected key {key!r} in the Medusa heads in {path}")
        parsed[int(match[1]), int(match[2]), match[3]] = value
    # Heads and layers from the weights: head h has blocks 0..L-1 and its unembedding at L.
    num_heads = 1 + max(h for h, _, _ in parsed)
    num_layers = 1 + max(layer for _, layer, kind in parsed if kind == "linear.weight")
    for h in range(num_heads):
        expected = {(h, i, "linear.weight") for i in range(num_layers)} | {(h, num_layers, "weight")}
        if not expected <= parsed.keys():
            raise ValueError(f"Medusa head {h} in {path} is incomplete: it lacks "
                             f"{sorted(f'{a}.{b}.{c}' for a, b, c in expected - parsed.keys())}")
    hidden = parsed[0, 0, "linear.weight"].shape[1]
    vocab = parsed[0, num_layers, "weight"].shape[0]
    _check_shape("Medusa", hidden, vocab, base, path)
    config = HeadsConfig(num_heads=num_heads, num_layers=num_layers, hidden_size=hidden,
                         vocab_size=vocab, shared_unembedding=False)
    heads = MedusaHeads(config)
    ours = {}
    for h in range(num_heads):
        for i in range(num_layers):
            ours[f"blocks.{h}.{i}.linear.weight"] = parsed[h, i, "linear.weight"]
            ours[f"blocks.{h}.{i}.linear.bias"] = parsed.get((h, i, "linear.bias"), torch.zeros(hidden))
        ours[f"lm_heads.{h}.weight"] = parsed[h, num_layers, "weight"]
    try:
        heads.load_state_dict({k: v.float() for k, v in ours.items()})
    except RuntimeError as e:
        raise ValueError(f"the Medusa heads in {path} have inconsistent shapes: {e}") from e
    meta_path = path / "config.json"
    base_name = json.loads(meta_path.read_text()).get("base_model_name_or_path", "") if meta_path.exists() else ""
    accuracies = prior_accuracies(num_heads)
    return HeadCheckpoint(heads, tune_tree(accuracies)[0], accuracies, base_name, "", "medusa")


def save_heads(path: str | Path, heads: MedusaHeads, accuracies: list[list[float]], base_model: str,
               base_checksum: str, extra: dict | None = None, dtype: torch.dtype = torch.float16) -> dict:
    """Write Gorgon's format (weights in `dtype`) with the tree tuned to `accuracies`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = heads.config
    paths, lengths = tune_tree(accuracies)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "base_model": base_model, "base_checksum": base_checksum,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "num_heads": config.num_heads, "num_layers": config.num_layers,
        "shared_unembedding": config.shared_unembedding, "token_input": config.token_input,
        "chained": config.chained, "dtype": str(dtype).removeprefix("torch."),
        "accuracies": [[round(a, 5) for a in row] for row in accuracies],
        "tree": {"num_nodes": TREE_NODES, "paths": [list(p) for p in paths],
                 "expected_accept_length": {str(b): round(v, 4) for b, v in lengths.items()}},
        **(extra or {}),
    }
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    if heads.draft_vocab is not None:
        state[DRAFT_VOCAB_KEY] = heads.draft_vocab.to(torch.int32).contiguous()
        meta["draft_vocab_size"] = len(heads.draft_vocab)
    save_file(state, str(path / GORGON_WEIGHTS))
    text = json.dumps(meta, indent=1)
    # one line per innermost list (accuracy rows, tree paths) keeps the file readable
    text = re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", lambda m: "[" + ", ".join(m[1].split()).replace(",,", ",") + "]", text)
    (path / GORGON_CONFIG).write_text(text + "\n")
    return meta


def save_medusa(path: str | Path, heads: MedusaHeads, base_lm_head: torch.Tensor | None = None,
                base_model: str = "", use_pt: bool = False) -> None:
    """Write Medusa's reference format (each head with its own unembedding: the base
    model's, `base_lm_head` [vocab, H], when the heads share it)."""
    if heads.config.token_input:
        raise ValueError("Medusa's format has no place for heads that read the next token; "
                         "save these heads in Gorgon's format (save_heads)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = heads.config
    state = {}
    for h in range(config.num_heads):
        for i, block in enumerate(heads.blocks[h]):
            state[f"{h}.{i}.linear.weight"] = block.linear.weight.detach().clone()
            state[f"{h}.{i}.linear.bias"] = block.linear.bias.detach().clone()
        if heads.lm_heads is not None:
            state[f"{h}.{config.num_layers}.weight"] = heads.lm_heads[h].weight.detach().clone()
        elif base_lm_head is not None:
            state[f"{h}.{config.num_layers}.weight"] = base_lm_head.detach().clone()
        else:
            raise ValueError("heads with a shared unembedding need base_lm_head to write Medusa's format")
    if use_pt:
        torch.save(state, path / MEDUSA_WEIGHTS[1])
    else:
        save_file(state, str(path / MEDUSA_WEIGHTS[0]))
    (path / "config.json").write_text(json.dumps({
        "medusa_num_heads": config.num_heads, "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": base_model}, indent=1) + "\n")
