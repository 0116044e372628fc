"""Engine steps (prompt chunks, decodes, tree verification) and drafts replayed from CUDA graphs.

Launched from Python, a step of the default model is ~30 layers x ~15 kernels, and the GPU
waits on the host between them (12 ms a plain step on an H200, docs/benchmarks.md). A CUDA
graph records a step's launches once and replays them in one call. A graph fixes its shapes
and launch arguments, so a step is padded to a bucket: its sequences, its longest tree and
its tokens, each rounded up to a power of two. The step's inputs go into static buffers that
every graph reads (their first B sequences and T tokens); padding tokens write no key (slot
-1) and padding sequences have no queries. The tree kernel derives each sequence's key split
from its length on the device, so one graph serves every context length. Prompt chunks have
graphs of their own, bucketed by chunks and tokens (the causal kernel's launch covers chunks
of up to all the bucket's tokens; each program finds its chunk's length on the device): a
step that holds both replays the chunks' graph, then the decodes'. Steps past the largest
bucket run eagerly.

Only the model body (embeddings to the final norm) is graphed: the runner takes the logits
of the rows it needs eagerly, and reads the output before the next replay overwrites it.
"""
from __future__ import annotations

import logging
import time

import torch

from models.attention import PAD_SLOT, AttentionMetadata, KVCache, slot_list, tree_mask_words
from models.llama import LlamaForCausalLM

logger = logging.getLogger("gorgon.graphs")


def bucket(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(n - 1, 0).bit_length()


def warm_up_buckets(max_seqs: int, max_tree_nodes: int, max_tokens: int) -> list[tuple[int, int, int]]:
    """Every bucket a step can fall in, to capture at start-up: capturing one mid-serve
    stalls every running request (a new kernel variant's first capture compiles it: on an
    H200, adaptive trees at 16 requests paused for 1.1 s). A bucket (S, M, T) holds n
    sequences, S/2 < n <= S, whose longest tree has m nodes, M/2 < m <= M: n - 1 + m to
    n * m tokens (at most max_tokens), T the power of two at or above that count."""
    buckets = []
    for seqs in (1 << i for i in range(bucket(max_seqs).bit_length())):
        for tree in (1 << i for i in range(bucket(max_tree_nodes).bit_length())):
            fewest = seqs // 2 + tree // 2 + 1
            most = min(min(seqs, max_seqs) * min(tree, max_tree_nodes), max_tokens)
            tokens = bucket(fewest)
            while tokens < 2 * most and fewest <= most:
                buckets.append((seqs, tree, tokens))
                tokens *= 2
    return buckets


def prefill_buckets(max_seqs: int, max_tokens: int) -> list[tuple[int, int, int]]:
    """The buckets of steps' prompt chunks, to capture at start-up: (S, 0, T) holds n
    chunks, S/2 < n <= S, of n to max_tokens tokens in all (T the power of two at or above)."""
    buckets = []
    for seqs in (1 << i for i in range(bucket(max_seqs).bit_length())):
        tokens = bucket(seqs // 2 + 1)
        while tokens < 2 * max_tokens and seqs // 2 + 1 <= max_tokens:
            buckets.append((seqs, 0, tokens))
            tokens *= 2
    return buckets


class StepGraphs:
    """One CUDA graph per (sequences, longest tree, tokens) bucket (longest tree 0: prompt
    chunks), captured at start-up (`warm_up`) or on first use.

    capture=False runs the same padded static-buffer step eagerly (what a graph would replay):
    on the CPU, for tests.
    """

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attention_cls, max_seqs: int,
                 max_tokens: int, max_blocks_per_seq: int, capture: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.attention_cls = attention_cls
        self.capture = capture
        self.max_seqs = bucket(max_seqs)
        self.max_tokens = bucket(max_tokens)
        self.max_blocks_per_seq = max_blocks_per_seq
        device = model.lm_head.weight.device
        # static inputs: token rows (ids, positions, slots, mask words) and sequence rows (lengths, offsets)
        self.token_rows = torch.zeros(4, self.max_tokens, dtype=torch.int64, device=device)
        self.seq_rows = torch.zeros(2, self.max_seqs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((self.max_seqs, max_blocks_per_seq), PAD_SLOT, dtype=torch.int32,
                                       device=device)
        self.device = device
        # bucket -> (graph, its output), or None where a capture failed (that bucket runs eagerly)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, query_lens: list[int], tables: list[list[int]]) -> bool:
        return (len(query_lens) <= self.max_seqs and sum(query_lens) <= self.max_tokens
                and max(map(len, tables), default=0) <= self.max_blocks_per_seq)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], query_lens: list[int], seq_lens: list[int],
            tables: list[list[int]], tree_masks: list[list[int]] | None, prefill: bool = False) -> torch.Tensor:
        """One step of trees and one-token decodes, or (prefill) one of prompt chunks: hidden
        [T, hidden] for its T tokens, a view of the graph's output, valid until the next `run`
        (a step of both kinds runs them one after the other: copy the first's)."""
        key = (bucket(len(query_lens)), 0 if prefill else bucket(max(query_lens)), bucket(sum(query_lens)))
        self._fill(key, input_ids, positions, query_lens, seq_lens, tables, tree_masks)
        if not self.capture:
            return self._forward(key)[:len(input_ids)]
        entry = self.graphs[key] if key in self.graphs else self._capture(key)
        if entry is None:   # its capture failed: this bucket runs eagerly
            return self._forward(key)[:len(input_ids)]
        graph, out = entry
        graph.replay()
        return out[:len(input_ids)]

    @torch.inference_mode()
    def warm_up(self, keys: list[tuple[int, int, int]]) -> None:
        """Capture these buckets now, over an all-padding step (no key written); the biggest
        first, so that the smaller ones reuse the shared pool's scratch memory."""
        started = time.perf_counter()
        for key in sorted(keys, key=lambda k: (k[2], k[0]), reverse=True):
            if key not in self.graphs and key[0] <= self.max_seqs and key[2] <= self.max_tokens:
                self._fill(key, [], [], [], [], [], None)
                self._capture(key)
        logger.info("captured %d CUDA graphs in %.1f s", sum(g is not None for g in self.graphs.values()),
                    time.perf_counter() - started)

    def _fill(self, key, input_ids, positions, query_lens, seq_lens, tables, tree_masks) -> None:
        num_seqs, longest_tree, num_tokens = key
        pad_tokens = num_tokens - len(input_ids)
        words = tree_mask_words(query_lens, tree_masks) if longest_tree else [0] * len(input_ids)  # (prompts: unread)
        slots = slot_list(query_lens, seq_lens, tables, self.kv_cache.block_size)
        rows = torch.tensor([input_ids + [0] * pad_tokens, positions + [0] * pad_tokens,
                             slots + [PAD_SLOT] * pad_tokens, words + [0] * pad_tokens], dtype=torch.int64)
        self.token_rows[:, :num_tokens].copy_(rows)
        cu = [0]
        for q_len in query_lens:
            cu.append(cu[-1] + q_len)
        pad_seqs = num_seqs - len(query_lens)
        self.seq_rows[:, :num_seqs + 1].copy_(torch.tensor(
            [list(seq_lens) + [0] * (pad_seqs + 1), cu + [cu[-1]] * pad_seqs], dtype=torch.int32))
        width = max(map(len, tables), default=0)
        if width:  # past a sequence's own blocks nothing is read: stale entries there are harmless
            self.block_tables[:len(tables), :width].copy_(torch.tensor(
                [t + [PAD_SLOT] * (width - len(t)) for t in tables], dtype=torch.int32))

    def _forward(self, key) -> torch.Tensor:
        num_seqs, longest_tree, num_tokens = key
        ids, positions, slots, words = self.token_rows[:, :num_tokens]
        seq_lens, cu = self.seq_rows[0, :num_seqs], self.seq_rows[1, :num_seqs + 1]
        metadata = AttentionMetadata(slot_mapping=slots, block_tables=self.block_tables[:num_seqs],
                                     seq_lens=seq_lens, cu_seqlens_q=cu,
                                     num_prefills=0 if longest_tree else num_seqs, tree_mask=words,
                                     seq_lens_host=(), query_lens_host=())
        attention = self.attention_cls(metadata, self.kv_cache, graph_bucket=key)
        return self.model.model(ids, positions, attention)

    def _capture(self, key) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Capture a bucket's graph (None, and that bucket eager from then on, if it fails)."""
        self.graphs[key] = capture_graph(lambda: self._forward(key), self.device, self.pool, f"step bucket {key}")
        return self.graphs[key]


class DraftGraphs:
    """The heads' guesses for up to max_rows rows, replayed from one CUDA graph per row
    bucket (powers of two).

    A draft is ~40 small kernels (each head's blocks and token projection, the shared
    unembedding, softmax, top-k); launched from Python they took 1.3 ms a step on the H200,
    more than the graphed forward itself. `guesses(hidden [R, H], next_ids [R])` -> (probs,
    ids) [R, heads, k] is the drafter's eager computation; it is replayed on static inputs
    whose first rows are the step's (padding rows hold stale states, their guesses unread).
    `reads()` lists the other tensors it reads (weights): a graph holds their addresses, so
    when one is replaced (new heads' weights, another draft vocabulary) the graphs are
    dropped and captured again. capture=False runs the same padded computation eagerly
    (tests on the CPU).
    """

    def __init__(self, guesses, reads, hidden_size: int, dtype: torch.dtype, max_rows: int, device: torch.device,
                 capture: bool = True):
        self.guesses = guesses
        self.reads = reads
        self.capture = capture
        self.device = device
        self.pool = torch.cuda.graph_pool_handle() if capture else None   # replays run one at a time
        self.hidden = torch.zeros(bucket(max_rows), hidden_size, dtype=dtype, device=device)
        self.next_ids = torch.zeros(bucket(max_rows), dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]] | None] = {}
        self._read: list[tuple[torch.Tensor, int]] = []   # what the graphs read (kept alive), their addresses

    def fits(self, rows: int) -> bool:
        return rows <= len(self.next_ids)

    @torch.inference_mode()
    def run(self, hidden: torch.Tensor, next_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(next_ids)
        size = bucket(rows)
        self.hidden[:rows].copy_(hidden)
        self.next_ids[:rows].copy_(torch.tensor(next_ids, dtype=torch.int64))
        if self.graphs and self._stale():
            logger.info("the heads' weights changed: draft graphs captured again")
            self.graphs.clear()
            self.warm_up()
        entry = self.graphs.get(size) if self.capture else None
        if entry is None:
            probs, ids = self.guesses(self.hidden[:size], self.next_ids[:size])
        else:
            graph, (probs, ids) = entry
            graph.replay()
        return probs[:rows], ids[:rows]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every bucket, the biggest first (the smaller ones reuse its memory), after
        one eager run on this stream (weights built lazily are built here, not on the side
        stream of a capture's trial run)."""
        if not self.capture:
            return
        started, size = time.perf_counter(), len(self.next_ids)
        self.guesses(self.hidden[:1], self.next_ids[:1])
        self._read = [(t.detach(), t.data_ptr()) for t in self.reads()]
        while size:
            self.graphs[size] = capture_graph(lambda: self.guesses(self.hidden[:size], self.next_ids[:size]),
                                              self.device, self.pool, f"draft bucket {size}")
            size //= 2
        logger.info("captured %d draft graphs in %.1f s", sum(g is not None for g in self.graphs.values()),
                    time.perf_counter() - started)

    def _stale(self) -> bool:
        now = self.reads()
        return len(now) != len(self._read) or any(t.data_ptr() != ptr for t, (_, ptr) in zip(now, self._read))


def capture_graph(fn, device: torch.device, pool, name: str):
    """fn's launches captured in a CUDA graph -> (graph, fn's output, which each replay
    rewrites), or None, logged, where the capture fails (the caller then runs fn eagerly,
    which raises if the failure was the computation's own)."""
    started = time.perf_counter()
    try:
        with torch.cuda.device(device):
            # one eager run first, on a side stream: Triton compiles and loads its kernels,
            # which a capture cannot do
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the server's other threads may touch CUDA's runtime meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = fn()
    except Exception as e:   # Triton's compile and resource errors are not RuntimeErrors
        logger.warning("CUDA graph capture failed for the %s (%s: %s); it runs eagerly", name, type(e).__name__, e)
        return None
    logger.debug("captured the %s in %.0f ms", name, (time.perf_counter() - started) * 1e3)
    return graph, out
