"""Self-distillation data for head training: the base model answers the project's prompts.

`build_prompt_list` fixes the prompts for a seed (a prefix of the list for a larger count
is the list for a smaller one); `generate_shards` answers them in chunks with the batched
generator and stores, per chunk, the answers' token ids and the fp16 final hidden states
that produced them (so training never runs the base model again). A chunk already on disk
is skipped: an interrupted run resumes where it stopped. Each prompt mix and seed has its own
data directory (`DataRecipe.data_dir`); training can read several.

Shard layout (safetensors): hidden [N, H] fp16, tokens [N] int32 (the model's own tokens:
hidden[i] produced tokens[i]), offsets [S + 1] int64 (answer s is rows offsets[s]:offsets[s+1]),
prompt_index [S] int64, held_out [S] int8.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models import prompts as P
from models.batch_generator import generate_batch

# Prompt mixes: source -> share. "general" made the first shipped data; "varied" adds the
# genres and coding tasks that the general mix lacks (everyday requests, composed code
# tasks). Training can read several mixes (train_heads --data).
MIXES = {
    "general": {"template": 0.45, "self_written": 0.25, "snippet": 0.20, "code": 0.10},
    "varied": {"everyday": 0.45, "composed_code": 0.35, "template": 0.20},
}
# Sources whose answers stay out of the datastore (server/datastore.py): the fixed coding
# requests ask for the evaluation prompts' tasks in other words (Fibonacci, palindromes,
# merging sorted lists), and their answers would be copied whole into the benchmarks.
DATASTORE_EXCLUDED = {"code"}
# Sources whose slot text is a request to the model; its cleaned answer becomes the prompt.
SELF_WRITTEN = {"self_written": P.clean_model_question}
SELF_WRITTEN_TOKENS = 48


@dataclass(frozen=True)
class DataRecipe:
    num_prompts: int = 96
    max_new_tokens: int = 160
    max_prompt_tokens: int = 320
    chunk_size: int = 48
    held_out_fraction: float = 0.08
    seed: int = 0
    mix: str = "general"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"unknown prompt mix {self.mix!r}; known: {', '.join(MIXES)}")

    def data_dir(self, work_dir: Path) -> Path:
        """Where this mix and seed keep prompts.json and shards/ (any prompt count shares it)."""
        return work_dir / f"data-{self.mix}-seed{self.seed}"


def slot_text(source: str, rng: random.Random, snippets: list[str]) -> str:
    if source == "template":
        topic, other = rng.sample(P.TOPICS, 2)
        return rng.choice(P.TASKS).format(topic=topic, other=other)
    if source == "snippet":
        return rng.choice(P.SNIPPET_TASKS).format(code=rng.choice(snippets))
    if source == "code":
        return rng.choice(P.CODE_TASKS)
    if source == "everyday":
        return P.everyday_prompt(rng)
    if source == "composed_code":
        return P.composed_code_prompt(rng)
    if source == "self_written":
        return P.SELF_WRITTEN_REQUEST.format(topic=rng.choice(P.TOPICS))
    raise ValueError(f"unknown prompt source {source!r}")


def build_prompt_slots(recipe: DataRecipe) -> list[tuple[str, str]]:
    """(source, text) per slot; a self-written slot's text is the request to the model."""
    rng = random.Random(recipe.seed)
    snippets = P.python_snippets()
    sources, weights = zip(*MIXES[recipe.mix].items())
    slots, seen = [], set()
    while len(slots) < recipe.num_prompts:
        source = rng.choices(sources, weights)[0]
        text = slot_text(source, rng, snippets)
        if (source, text) not in seen:  # code tasks and requests repeat; keep each once
            seen.add((source, text))
            slots.append((source, text))
    return slots


def build_prompt_list(model, tokenizer, recipe: DataRecipe, data_dir: Path, max_batch: int) -> list[dict]:
    """Prompts with their split; self-written ones are asked of the model (greedy) first."""
    path = data_dir / "prompts.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if len(cached) >= recipe.num_prompts:
            return cached[: recipe.num_prompts]
    slots = build_prompt_slots(recipe)
    requests = [i for i, (source, _) in enumerate(slots) if source in SELF_WRITTEN]
    written: dict[int, str | None] = {}
    if requests:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": slots[i][1]}]) for i in requests]
        bar = tqdm(total=len(ids), desc="model-written prompts", unit="prompt")
        for done in generate_batch(model, ids, [0.0] * len(ids), SELF_WRITTEN_TOKENS,
                                   tokenizer.eos_token_ids, max_batch=max_batch, keep_hidden=False):
            source = slots[requests[done.index]][0]
            written[requests[done.index]] = SELF_WRITTEN[source](tokenizer.decode(done.output_ids))
            bar.update()
        bar.close()
    out = []
    for i, (source, text) in enumerate(slots):
        if source in SELF_WRITTEN:
            text = written[i] or text  # an unusable question: answer the request itself
        out.append({"source": source, "text": text,
                    "held_out": P.is_held_out(text, recipe.held_out_fraction)})
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def generate_shards(model, tokenizer, recipe: DataRecipe, data_dir: Path, max_batch: int = 48) -> list[Path]:
    """Answer every prompt (greedy), chunk by chunk; returns the shard paths."""
    prompt_list = build_prompt_list(model, tokenizer, recipe, data_dir, max_batch)
    shard_dir = data_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    chunks = range(0, len(prompt_list), recipe.chunk_size)
    paths = [shard_dir / f"shard_{i // recipe.chunk_size:05d}.safetensors" for i in chunks]
    todo = [(start, path) for start, path in zip(chunks, paths) if not path.exists()]
    bar = tqdm(total=sum(len(prompt_list[start: start + recipe.chunk_size]) for start, _ in todo),
               desc="answers", unit="prompt")
    for start, path in todo:
        items = prompt_list[start: start + recipe.chunk_size]
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p["text"]}])[-recipe.max_prompt_tokens:]
               for p in items]
        done = sorted(generate_batch(model, ids, [0.0] * len(ids), recipe.max_new_tokens,
                                     tokenizer.eos_token_ids, max_batch=max_batch,
                                     on_token=lambda n: bar.set_postfix(step_tokens=n)),
                      key=lambda c: c.index)
        bar.update(len(items))
        lengths = torch.tensor([0] + [len(c.output_ids) for c in done])
        tmp = path.with_suffix(".tmp")
        save_file({
            "hidden": torch.cat([c.hidden_states() for c in done]).contiguous(),
            "tokens": torch.tensor([t for c in done for t in c.output_ids], dtype=torch.int32),
            "offsets": lengths.cumsum(0),
            "prompt_index": torch.arange(start, start + len(items)),
            "held_out": torch.tensor([p["held_out"] for p in items], dtype=torch.int8),
        }, str(tmp))
        tmp.rename(path)
    bar.close()
    return paths


def load_shards(data_dir: Path, held_out: bool, max_shards: int | None = None):
    """Concatenate one split: (hidden [N, H] fp16, tokens [N] int64, offsets [S + 1])."""
    paths = sorted((data_dir / "shards").glob("shard_*.safetensors"))[:max_shards]
    hidden, tokens, lengths = [], [], []
    for path in paths:
        shard = load_file(str(path))
        offsets = shard["offsets"].tolist()
        for s, flag in enumerate(shard["held_out"].tolist()):
            if bool(flag) == held_out:
                hidden.append(shard["hidden"][offsets[s]:offsets[s + 1]])
                tokens.append(shard["tokens"][offsets[s]:offsets[s + 1]].long())
                lengths.append(offsets[s + 1] - offsets[s])
    if not hidden:
        raise ValueError(f"no {'held-out' if held_out else 'training'} answers in {data_dir / 'shards'}; "
                         "generate data first (python -m models.train_heads data ...)")
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.cat(hidden), torch.cat(tokens), offsets


def datastore_answers(data_dir: Path, max_shards: int | None = None) -> list[list[int]]:
    """The training split's answers (token ids), without DATASTORE_EXCLUDED sources."""
    items = json.loads((data_dir / "prompts.json").read_text())
    answers = []
    for path in sorted((data_dir / "shards").glob("shard_*.safetensors"))[:max_shards]:
        shard = load_file(str(path))
        offsets, tokens = shard["offsets"].tolist(), shard["tokens"].tolist()
        for s, index in enumerate(shard["prompt_index"].tolist()):
            item = items[index]
            if not item["held_out"] and item["source"] not in DATASTORE_EXCLUDED:
                answers.append(tokens[offsets[s]:offsets[s + 1]])
    return answers
