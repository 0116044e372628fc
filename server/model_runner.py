"""Runs one scheduled step: Python lists in, one forward, accepted tokens and drafts out.

This is the one place where bookkeeping turns into tensors. A decode step verifies each
sequence's candidate tree (root = its last token, other nodes = its heads' guesses), keeps
the accepted path (moving its keys and values into place in the cache), and runs the heads
on the hidden state of the last kept token to draft the next tree (for the sequences the
speculation policy marked: drafting costs time, and a sequence that decodes plainly at this
load does not need it).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from models.attention import KVCache, build_metadata
from models.heads import MedusaHeads
from models.llama import LlamaForCausalLM
from server.acceptance import accept_greedy, accept_rejection, accept_typical, typical_verdicts
from server.drafter import Draft, Drafter
from server.logits_processor import Job, changes_logits, process_logits
from server.structured import apply_masks, masks
from server.outputs import TokenLogprob
from server.sampler import greedy_tokens, pick, probabilities, sample, token_logprobs
from server.scheduler import SchedulerOutput, ScheduledSequence
from server.step_graphs import StepGraphs
from server.tree import LOOKUP_RANK, Path, kept_by_tree

SAMPLING_ROWS = 128   # tree rows per sampling-distribution call (server/sampler.py): ~25 MB a temporary


@dataclass
class StepResult:
    new_token_ids: list[int]      # accepted drafted tokens then the bonus token (empty mid-prompt)
    num_cached_tokens: int        # after the commit
    drafted: int = 0              # tree nodes besides the root
    accepted: int = 0             # drafted tokens kept
    head_accepted: int = 0        # of them, those the heads' branch of the tree would have kept
    draft: Draft | None = None    # the heads' guesses for the next tree (server/drafter.py)
    verdicts: list[bool] | None = None  # typical acceptance's verdict on each of the tree's probes
    logprobs: list[TokenLogprob] | None = None  # per new token, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # a prompt chunk's: for the prompt tokens after its rows


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, heads: MedusaHeads | None, kv_cache: KVCache,
                 attention_cls, tree_paths: tuple[Path, ...], graphs: StepGraphs | None = None,
                 eos_token_ids: frozenset[int] = frozenset()):
        """eos_token_ids: what `min_tokens` holds back besides a request's stop_token_ids."""
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.attention_cls = attention_cls
        self.tree_paths = tree_paths
        self.device = model.lm_head.weight.device
        self.drafter = None
        if heads is not None:
            self.drafter = Drafter(heads, model, tree_paths, graph_rows=graphs.max_seqs if graphs else 0,
                                   capture=graphs.capture if graphs else None)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> list[tuple[ScheduledSequence, StepResult]]:
        items = batch.prefills + batch.decodes
        input_ids, positions, tree_masks, logits_rows = [], [], [], []
        query_lens, seq_lens, tables, first_logit = [], [], [], []
        prompt_rows = {}   # item index -> its first logits row, for prompt chunks scored row by row
        for item in items:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_cached_tokens
            if item.is_prefill:
                input_ids += seq.token_ids[start:start + n]
                positions += range(start, start + n)
                needs_logits = start + n == seq.num_tokens
            else:
                tree = item.tree.tree
                input_ids += item.tree.tokens
                positions += [start + d for d in tree.depths]
                tree_masks.append(list(tree.ancestor_masks))
                needs_logits = True
            if item.is_prefill and seq.scores_prompt:   # every row: each gives the next prompt token's
                prompt_rows[len(first_logit)] = len(logits_rows)
                logits_rows += range(len(positions) - n, len(positions))
                first_logit.append(len(logits_rows) - 1)   # the last row gives the first new token
            else:
                first_logit.append(len(logits_rows))
                if needs_logits:
                    row0 = len(positions) - (1 if item.is_prefill else n)
                    logits_rows += range(row0, len(positions))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.block_table)
        logits, hidden = self.forward(input_ids, positions, query_lens, seq_lens, tables, len(batch.prefills),
                                      tree_masks, logits_rows)
        self._process_logits(items, first_logit, logits)
        argmax = greedy_tokens(logits)
        distributions, drawn = self._distributions(items, first_logit, logits)

        results, moves, head_rows, head_items = [], ([], []), [], []
        scored = []   # (result, the logits rows that chose its new tokens, alternatives) for logprobs
        prompt_scored = []   # (result, its first logits row, the prompt tokens its rows give, alternatives)
        offset = 0
        for index, (item, row) in enumerate(zip(items, first_logit)):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_cached_tokens
            if item.is_prefill:
                if start + n < seq.num_tokens:  # a chunk in the middle of the prompt
                    results.append(StepResult([], start + n))
                else:
                    token = argmax[row] if seq.params.is_greedy else int(
                        pick(logits[row:row + 1], seq.params, seq.generator)[0])
                    results.append(StepResult([token], start + n))
                    if seq.params.logprobs is not None:
                        scored.append((results[-1], [row], seq.params.logprobs))
                    if item.draft:
                        head_rows.append(offset + n - 1)
                        head_items.append((len(results) - 1, item.draft))
                if index in prompt_rows:   # row j (position start + j) gives prompt token start + j + 1
                    count = min(n, seq.num_prompt_tokens - 1 - start)
                    prompt_scored.append((results[-1], prompt_rows[index], seq.prompt_ids[start + 1:start + 1 + count],
                                          seq.params.prompt_logprobs))
            else:
                tree, tokens = item.tree.tree, item.tree.tokens
                if seq.params.is_greedy:
                    kept, bonus = accept_greedy(tree, tokens, argmax[row:row + n])
                else:
                    probs = distributions[index]
                    if index in drawn:   # an unseeded plain step: drawn with its group's (_distributions)
                        kept, bonus = [], drawn[index]
                    else:
                        rule = accept_typical if seq.params.acceptance == "typical" else accept_rejection
                        kept, bonus = rule(tree, tokens, probs, seq.params, seq.generator)
                for depth, node in enumerate(kept, start=1):
                    if node != depth:
                        moves[0].append(self._slot(seq.block_table, start + node))
                        moves[1].append(self._slot(seq.block_table, start + depth))
                new_tokens = [tokens[k] for k in kept] + [bonus]
                head_accepted = len(kept)
                if kept and LOOKUP_RANK in tree.paths[kept[-1]]:  # what the heads' own branch would have kept
                    head_accepted = kept_by_tree(item.tree.head_paths, item.tree.head_tokens, new_tokens)
                results.append(StepResult(new_tokens, start + 1 + len(kept), drafted=n - 1, accepted=len(kept),
                                          head_accepted=head_accepted))
                if seq.params.logprobs is not None:   # the root's row gave the first token, kept node k's the next
                    scored.append((results[-1], [row + node for node in [0] + kept], seq.params.logprobs))
                if item.tree.probes and not seq.params.is_greedy:
                    results[-1].verdicts = typical_verdicts(probs[0], seq.params, item.tree.probes)
                if item.draft:
                    head_rows.append(offset + (kept[-1] if kept else 0))
                    head_items.append((len(results) - 1, item.draft))
            offset += n
        if scored:
            self._score(scored, logits)
        for result, first, tokens, top in prompt_scored:   # consecutive rows: a view, no copy
            result.prompt_logprobs = [TokenLogprob(logprob, tuple(best)) for logprob, best in
                                      token_logprobs(logits[first:first + len(tokens)], tokens, top)]
        if moves[0]:
            self.kv_cache.move_slots(torch.tensor(moves[0], device=self.device),
                                     torch.tensor(moves[1], device=self.device))
        if self.drafter is not None and head_rows:
            drafted = [results[i] for i, _ in head_items]
            drafts = self.drafter.draft(hidden[torch.tensor(head_rows, device=self.device)],
                                        [r.new_token_ids[-1] for r in drafted],   # the token each just got
                                        [size for _, size in head_items])
            for result, draft in zip(drafted, drafts):
                result.draft = draft
        return list(zip(items, results))

    def _process_logits(self, items: list[ScheduledSequence], first_logit: list[int], logits: torch.Tensor) -> None:
        """Each request's grammar mask (server/structured.py), then its logit_bias, min_tokens
        and penalties (server/logits_processor.py), on the rows that choose its tokens: a tree
        node's from its own path."""
        jobs, masked, grammars = [], [], []   # grammars: (grammar, its paths, its first row in masked)
        for item, row in zip(items, first_logit):
            seq, n = item.seq, item.num_new_tokens
            if seq.grammar is None and not changes_logits(seq.params):
                continue
            if item.is_prefill:
                if seq.num_cached_tokens + n < seq.num_tokens:   # mid-prompt: no token chosen
                    continue
                rows, paths = [row], [()]
            else:
                tree, tokens = item.tree.tree, item.tree.tokens
                rows, paths = list(range(row, row + n)), [()]
                for node in range(1, n):   # parents come first
                    paths.append(paths[tree.parents[node]] + (tokens[node],))
            params = seq.params
            if seq.grammar is not None:
                grammars.append((seq.grammar, paths, len(masked)))
                masked += rows
            if changes_logits(params):
                seq.token_counts.update(seq.prompt_ids, seq.token_ids, logits.shape[1], logits.device)
                stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
                jobs.append(Job(rows, paths, params, seq.token_counts, stop_ids))
        if grammars:   # first: min_tokens reads what a grammar left
            bits = masks(len(masked), logits.shape[1])
            for grammar, paths, start in grammars:
                grammar.fill(bits[start:start + len(paths)], paths)
            apply_masks(logits, masked, bits)
        if jobs:
            process_logits(logits, jobs)

    @staticmethod
    def _score(scored: list[tuple[StepResult, list[int], int]], logits: torch.Tensor) -> None:
        """Each result's new tokens' log-probabilities and alternatives, from the rows that
        chose them (one call for the step): a token kept from a tree gets the numbers plain
        decoding gives it, its row's."""
        rows = [r for _, result_rows, _ in scored for r in result_rows]
        tokens = [t for result, _, _ in scored for t in result.new_token_ids]
        entries = iter(token_logprobs(logits[torch.tensor(rows, device=logits.device)], tokens,
                                      max(top for _, _, top in scored)))
        for result, result_rows, top in scored:
            result.logprobs = [TokenLogprob(logprob, tuple(best[:top])) for logprob, best in
                               (next(entries) for _ in result_rows)]

    @staticmethod
    def _distributions(items: list[ScheduledSequence], first_logit: list[int],
                       logits: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
        """Each sampled decode's tree rows' sampling distributions (by its index in items):
        one `probabilities` call for decodes that share temperature, top-k and top-p (up to
        SAMPLING_ROWS rows a call, which bounds the temporaries), not one per sequence (at 32
        sampled sequences a step, one call each cost ~18% of the step). And the next token of
        each unseeded plain step among them (a tree of the root alone keeps nothing: its
        token is a draw from the root's distribution under either rule), drawn in one call."""
        groups: dict[tuple, list[list[int]]] = {}
        for i, item in enumerate(items):
            params = item.seq.params
            if not item.is_prefill and not params.is_greedy:
                chunks = groups.setdefault((params.temperature, params.top_k, params.top_p), [[]])
                if chunks[-1] and sum(items[j].num_new_tokens for j in chunks[-1]) + item.num_new_tokens > SAMPLING_ROWS:
                    chunks.append([])
                chunks[-1].append(i)
        distributions, drawn = {}, {}
        for members in (chunk for chunks in groups.values() for chunk in chunks):
            sizes = [items[i].num_new_tokens for i in members]
            rows = [r for i, n in zip(members, sizes) for r in range(first_logit[i], first_logit[i] + n)]
            probs = probabilities(logits[torch.tensor(rows, device=logits.device)], items[members[0]].seq.params)
            distributions.update(zip(members, probs.split(sizes)))
            plain = [m for m, i in enumerate(members) if sizes[m] == 1 and items[i].seq.generator is None]
            if len(plain) > 1:
                roots = list(accumulate([0] + sizes[:-1]))   # each member's first row in probs
                picked = probs if len(rows) == len(plain) else probs[torch.tensor([roots[m] for m in plain],
                                                                                  device=probs.device)]
                drawn.update(zip((members[m] for m in plain), sample(picked, None).tolist()))
        return distributions, drawn

    def forward(self, input_ids: list[int], positions: list[int], query_lens: list[int], seq_lens: list[int],
                tables: list[list[int]], num_prefills: int, tree_masks: list[list[int]] | None,
                logits_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One packed step -> (logits [len(logits_rows), vocab], hidden [T, hidden]); from CUDA
        graphs when the step fits them (hidden then valid until the next step): its prompt
        chunks' graph, then its trees' and decodes'."""
        if self.graphs is not None and self.graphs.fits(query_lens, tables):
            split = sum(query_lens[:num_prefills])   # prompt chunks' tokens come first
            parts = []
            if num_prefills:
                parts.append(self.graphs.run(input_ids[:split], positions[:split], query_lens[:num_prefills],
                                             seq_lens[:num_prefills], tables[:num_prefills], None, prefill=True))
            if num_prefills < len(query_lens):
                if parts:   # the next replay may reuse the first graph's output memory
                    parts[0] = parts[0].clone()
                parts.append(self.graphs.run(input_ids[split:], positions[split:], query_lens[num_prefills:],
                                             seq_lens[num_prefills:], tables[num_prefills:], tree_masks))
            hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
            every_row = len(logits_rows) == len(input_ids)   # a tree step: logits for all its rows
            rows = hidden if every_row else hidden[torch.tensor(logits_rows, dtype=torch.long, device=self.device)]
            return self.model.compute_logits(rows), hidden
        metadata = build_metadata(query_lens, seq_lens, tables, self.kv_cache.block_size, num_prefills,
                                  tree_masks, device=self.device)
        return self.model(torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
                          self.attention_cls(metadata, self.kv_cache),
                          torch.tensor(logits_rows, dtype=torch.long, device=self.device))

    def _slot(self, block_table: list[int], index: int) -> int:
        size = self.kv_cache.block_size
        return block_table[index // size] * size + index % size
