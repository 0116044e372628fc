"""Everything the engine loads at start-up: model, tokenizer, heads, attention backend, costs."""
from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.attention import MAX_TREE_TOKENS, TorchAttention, build_metadata
from models.cpu_attention import BatchInvariantCpuAttention, CpuAttention
from models.heads import MedusaHeads
from models.llama import LlamaForCausalLM
from models.loader import load_model, parse_dtype
from models.packed_linear import can_pack, pack_linears, round_to_q8_0
from models.tokenizer import Tokenizer
from server.config import EngineConfig
from server.datastore import Datastore
from server.cost_model import MEASURED_SIZES, StepCostModel
from server.model_runner import ModelRunner

DRAFT_SIZE = 8  # tree nodes per draft when timing the heads at start-up
DENSE_ROUNDS = 5  # timings of each step size up to 64 tokens, interleaved

logger = logging.getLogger("gorgon.loading")


@dataclass(frozen=True)
class Components:
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    heads: MedusaHeads | None
    tree_paths: tuple[tuple[int, ...], ...]
    accuracies: list[list[float]]
    attention_cls: type
    device: torch.device
    model_name: str
    datastore: Datastore | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def int8_by_default(device: str, dtype: str, attention_backend: str = "auto") -> bool:
    """The server's --int8-linear when neither it nor --no-int8-linear is given: on where the
    model runs in fp32 on a CPU that runs the integer kernels (AVX-512 VNNI), with the CPU's
    own attention. The engine's own default (EngineConfig) stays the exact path."""
    try:
        if attention_backend != "auto" or resolve_device(device).type != "cpu" or parse_dtype(dtype) != torch.float32:
            return False
    except ValueError:   # a bad --device or --dtype: EngineConfig's checks word the error
        return False
    from models.packed_linear import int8_supported
    return int8_supported()


def attention_class(name: str, device: torch.device, batch_invariant: bool = False) -> type:
    """batch_invariant (on the CPU): prompts through Gorgon's kernel too, every row's bits
    independent of chunking and batching (what --int8-linear needs to stay exact)."""
    if name == "torch":
        return TorchAttention
    if name == "auto" and device.type != "cuda":   # PyTorch's where the C++ kernels do not run
        return BatchInvariantCpuAttention if batch_invariant else CpuAttention
    from kernels.backend import attention_backend
    return attention_backend(name, device)


def load_components(config: EngineConfig, heads_override=None) -> Components:
    """Load the model and its heads. heads_override: an object with heads/tree_paths/accuracies."""
    device = resolve_device(config.device)
    dtype = parse_dtype(config.dtype)
    if config.model is None:
        from models.fetch import ensure_default_model
        model_dir = ensure_default_model()
    else:
        model_dir = Path(config.model)
    started = time.perf_counter()
    model = load_model(model_dir, dtype, device, int8=config.int8_linear)
    # only layers whose weights are exact Q4_1 / Q8_0 values run integer products: a model
    # with none (a Hugging Face fp32 or bf16 checkpoint) stays on the exact path throughout
    int8 = any(getattr(m, "int8", None) is not None for m in model.modules())
    if config.int8_linear and not int8:
        logger.warning("--int8-linear: no weight matrix of %s holds Q4_1 / Q8_0 values; exact fp32 products",
                       model_dir)
    tokenizer = Tokenizer(model_dir, model.config.eos_token_id)
    logger.info("loaded %s (%s%s) in %.1f s", model_dir, dtype,
                ", 8-bit integer linear layers" if int8 else "", time.perf_counter() - started)
    checkpoint = heads_override
    if checkpoint is None and config.speculation and config.heads != "none":
        from models.head_checkpoint import DEFAULT_HEADS_DIR, load_heads, model_checksum
        checkpoint = load_heads(config.heads or DEFAULT_HEADS_DIR, model.config, dtype, device)
        if checkpoint.base_checksum and checkpoint.base_checksum != model_checksum(model_dir):
            logger.warning("the heads were trained for another base model (%s); they will guess poorly "
                           "but output stays exact", checkpoint.base_model)
    heads = checkpoint.heads.to(device=device, dtype=dtype).eval() if checkpoint is not None else None
    if heads is not None and can_pack(device, dtype):  # the engine only drafts with them: packed like the
        heads = copy.deepcopy(heads)                    # model's (a copy: the caller's heads stay trainable)
        if int8:   # drafts need not be exact: their weights rounded to Q8_0, integer products
            with torch.no_grad():
                for linear in (m for m in heads.modules() if isinstance(m, torch.nn.Linear)):
                    linear.weight.copy_(round_to_q8_0(linear.weight))
        pack_linears(heads, int8=int8)
    datastore = load_datastore(config, checkpoint)
    if datastore is not None and datastore.max_token >= model.config.vocab_size:
        raise ValueError(f"the datastore holds token id {datastore.max_token}, beyond this model's vocabulary "
                         f"({model.config.vocab_size}): it was made with another tokenizer")
    return Components(
        model=model, tokenizer=tokenizer, heads=heads, datastore=datastore,
        tree_paths=tuple(checkpoint.tree_paths) if checkpoint is not None else (),
        accuracies=list(checkpoint.accuracies) if checkpoint is not None else [],
        attention_cls=attention_class(config.attention_backend, device, batch_invariant=int8),
        device=device, model_name=Path(model_dir).name)


def load_datastore(config: EngineConfig, checkpoint) -> Datastore | None:
    """The datastore of --datastore, else the head checkpoint's own (if it has one). Its
    chains extend the heads' trees, so without heads there is none."""
    if not config.speculation or not config.lookup_tokens or config.datastore == "none":
        return None
    if checkpoint is None:
        if config.datastore:
            logger.warning("--datastore %s is not used: datastore chains extend the heads' trees, and there are "
                           "no heads", config.datastore)
        return None
    path = config.datastore or getattr(checkpoint, "datastore_path", None)
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--datastore: no datastore file at {path} (a datastore.safetensors, or 'none')")
    started = time.perf_counter()
    datastore = Datastore.load(path)
    logger.info("datastore %s: %d tokens, indexed in %.1f s", path, datastore.num_tokens,
                time.perf_counter() - started)
    return datastore


def _best_time(fn, device: torch.device, repeats: int = 3) -> float:
    """Best of `repeats` timings: one noisy point would steer the policy for long."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


@torch.inference_mode()
def measure_step_costs(runner: ModelRunner, max_tokens: int) -> StepCostModel:
    """Time forwards (with logits on every row, as a tree step has) at growing token counts,
    the cost of attending to a longer context, and the heads' drafting."""
    model, kv_cache, device = runner.model, runner.kv_cache, runner.device
    block_size = kv_cache.block_size

    def forward_time(query_lens: list[int], context: int, repeats: int) -> float:
        """Chains of query_lens tokens (trees whose nodes each see the ones before) over
        `context` cached tokens each: a step of n tokens is timed on the path decode and tree
        steps take (the C++ decoder on the CPU, a graphed step with CUDA graphs)."""
        per_seq = -(-(context + max(query_lens)) // block_size)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(query_lens))]
        seq_lens = [context + q for q in query_lens]
        masks = [[(1 << (i + 1)) - 1 for i in range(q)] for q in query_lens]
        n = sum(query_lens)
        positions = [context + i for q in query_lens for i in range(q)]
        if runner.graphs is not None:
            step = ([0] * n, positions, query_lens, seq_lens, tables, 0, masks, list(range(n)))
            return _best_time(lambda: runner.forward(*step), device, repeats)
        metadata = build_metadata(query_lens, seq_lens, tables, block_size, 0, masks, device=device)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        positions = torch.tensor(positions, device=device)
        return _best_time(lambda: model(ids, positions, runner.attention_cls(metadata, kv_cache)), device, repeats)

    def chains(n: int) -> list[int]:
        """n tokens as chains of at most MAX_TREE_TOKENS (a tree's most)."""
        return [MAX_TREE_TOKENS] * (n // MAX_TREE_TOKENS) + ([n % MAX_TREE_TOKENS] if n % MAX_TREE_TOKENS else [])

    capacity = kv_cache.num_blocks * block_size
    sizes = [n for n in MEASURED_SIZES if n <= min(max_tokens, capacity)]
    for n in sizes:  # warm-up: a first run compiles kernels (on CUDA, captures the step's graph)
        forward_time(chains(n), 0, 1)
    # the small sizes round by round, median of DENSE_ROUNDS: a slow spell of a shared
    # machine then slows one round of every size, not every timing of one size (which bent
    # the curve: 2 tokens read 1.2x one, and the policy took 8-node trees for 4-node prices)
    small = [n for n in sizes if n <= 64]
    rounds = [[forward_time(chains(n), 0, 1) for n in small] for _ in range(DENSE_ROUNDS)]
    dense = {n: statistics.median(times) for n, times in zip(small, zip(*rounds))}
    dense.update({n: forward_time(chains(n), 0, 2) for n in sizes if n > 64})
    # reading the context: 16 one-token steps over a long context against the same over none
    seqs, context = 16, min(512, capacity // 16 - block_size)
    per_key = per_tree = 0.0
    if context > 64:
        long, short = forward_time([1] * seqs, context, 3), forward_time([1] * seqs, 0, 3)
        per_key = max(0.0, long - short) / (seqs * context)
        # a tree beyond its tokens (its mask, another attention group): half of the 16
        # sequences verify two-node trees, against 16 one-token decodes
        curve = StepCostModel(dense).dense
        mixed = forward_time([1] * (seqs // 2) + [2] * (seqs // 2), context, 3)
        per_tree = max(0.0, mixed - long - (curve(seqs * 3 // 2) - curve(seqs))) / (seqs // 2)
    draft_fixed = draft_per_seq = 0.0
    if runner.drafter is not None:  # drafting trees of a typical size (chained heads' cost grows with it)
        hidden = torch.zeros(32, model.config.hidden_size, dtype=model.lm_head.weight.dtype, device=device)
        one, many = (_best_time(lambda: runner.drafter.draft(hidden[:k], [0] * k, [DRAFT_SIZE] * k), device)
                     for k in (1, 32))
        draft_per_seq = max(0.0, many - one) / 31
        draft_fixed = max(0.0, one - draft_per_seq)
    logger.info("step cost: %s ms by tokens; %.2f us per key read; %.2f ms per tree; drafting %.1f ms + %.2f ms "
                "per sequence", ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in dense.items()), per_key * 1e6,
                per_tree * 1e3, draft_fixed * 1e3, draft_per_seq * 1e3)
    return StepCostModel(dense, per_key, per_tree, draft_fixed, draft_per_seq)
