"""The engine: requests in, one scheduled and verified step at a time, outputs out.

    step() = schedule -> run the model (verify trees, accept, draft) -> append tokens and
             check stop rules -> free what finished -> outputs
"""
from __future__ import annotations

import logging
import time

from kernels.backend import TritonAttention
from models.attention import KVCache
from models.loader import parse_dtype
from server import metrics
from server.block_manager import BlockManager, blocks_for
from server.config import EngineConfig
from server.model_runner import ModelRunner, StepResult
from server.outputs import RequestOutput
from server.output_processor import OutputProcessor
from server.sampler import make_generator
from server.sampling_params import SamplingParams
from server.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from server.sequence import Sequence, SequenceStatus
from server.speculation_policy import SpeculationPolicy
from server.structured import StructuredOutputs
from server.step_graphs import StepGraphs, prefill_buckets, warm_up_buckets
from server.loading import load_components, measure_step_costs

logger = logging.getLogger("gorgon.engine")
# New requests start no lower than this, so they still try short trees and learn their own skill.
SKILL_PRIOR_FLOOR = 0.3


class LLMEngine:
    def __init__(self, config: EngineConfig, heads_override=None):
        """heads_override: a loaded head checkpoint (heads, tree_paths, accuracies) to use instead."""
        self.config = config
        parts = load_components(config, heads_override)
        self.model, self.tokenizer, self.heads = parts.model, parts.tokenizer, parts.heads
        self.datastore = parts.datastore
        self.model_name = parts.model_name
        self.device = parts.device
        model_config = self.model.config
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        dtype = self.model.lm_head.weight.dtype
        storage = dtype if config.kv_cache_dtype == "auto" else parse_dtype(config.kv_cache_dtype)
        if storage != dtype and self.device.type != "cpu":
            raise ValueError(f"a {storage} KV cache beside a {dtype} model runs on the CPU only")
        per_block = KVCache.bytes_per_block(model_config.num_hidden_layers, config.block_size,
                                            model_config.num_key_value_heads, model_config.head_dim, storage)
        num_blocks = int(config.kv_cache_memory_gb * 2**30 // per_block)
        self.kv_cache = KVCache(model_config.num_hidden_layers, num_blocks, config.block_size,
                                model_config.num_key_value_heads, model_config.head_dim, dtype, self.device,
                                storage_dtype=storage)
        self.block_manager = BlockManager(num_blocks, config.block_size, caching=config.prefix_caching)
        tree_paths = parts.tree_paths if config.speculation and self.heads is not None else ()
        graphs = None
        if config.cuda_graphs and self.device.type == "cuda" and parts.attention_cls is TritonAttention:
            graphs = StepGraphs(self.model, self.kv_cache, parts.attention_cls, config.max_num_seqs,
                                config.max_num_batched_tokens,
                                blocks_for(self.max_model_len + config.max_tree_nodes, config.block_size))
            graphs.warm_up(warm_up_buckets(config.max_num_seqs, config.max_tree_nodes if config.speculation else 1,
                                           config.max_num_batched_tokens)
                           + prefill_buckets(config.max_num_seqs, config.max_num_batched_tokens))
        self.runner = ModelRunner(self.model, self.heads if tree_paths else None, self.kv_cache,
                                  parts.attention_cls, tree_paths, graphs, self.tokenizer.eos_token_ids)
        self.cost_model = measure_step_costs(self.runner, max(config.max_num_batched_tokens, 64))
        self.accuracies = parts.accuracies
        self.skill_prior = 1.0  # moving average of finished-step skills, seeds new sequences
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   policy=None)
        self.set_tree_budget(config.tree_budget)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.structured = StructuredOutputs(self.tokenizer, model_config.vocab_size)
        self.sequences: dict[str, Sequence] = {}
        logger.info("engine ready: model %s, %d KV blocks of %d tokens, speculation %s",
                    self.model_name, num_blocks, config.block_size,
                    f"on ({len(tree_paths) + 1}-node trees max)" if tree_paths else
                    "context lookup only (no heads)" if config.speculation and config.lookup_tokens else "off")

    def set_tree_budget(self, tree_budget: int | None) -> None:
        """Fix every tree's size in nodes (1 = plain decoding) or, with None, adapt it to load."""
        self.policy = SpeculationPolicy(self.runner.tree_paths, self.accuracies, self.cost_model,
                                        self.config.max_tree_nodes, tree_budget,
                                        self.config.lookup_tokens if self.config.speculation else 0,
                                        self.datastore)
        self.policy.typical_skill = min(1.0, self.skill_prior)
        self.scheduler.policy = self.policy

    # ---- requests in -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                f"asks for {len(prompt_ids)} prompt tokens plus {params.max_tokens} completion tokens")
        worst = blocks_for(len(prompt_ids) + params.max_tokens + self.config.max_tree_nodes, self.config.block_size)
        if worst > self.block_manager.num_blocks:
            raise ValueError(f"the request needs up to {worst} KV-cache blocks but the cache holds "
                             f"{self.block_manager.num_blocks}; raise --kv-cache-memory-gb")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        seq = Sequence(request_id, list(prompt_ids), params)
        if params.grammar is not None:
            seq.grammar = self.structured.grammar(params.grammar)
        # new requests start from what recent ones achieved, never above the measured
        # accuracies: the sequences that verify trees under load are the best-guessed ones,
        # and seeding every newcomer with their skill made a busy batch plan trees for all
        seq.spec.skill = min(1.0, self.skill_prior)
        seq.generator = make_generator(params, self.device)
        self.output_processor.start(seq)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        metrics.num_requests_waiting.set(len(self.scheduler.waiting))

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        metrics.requests.labels("abort", "aborted").inc()
        self._update_gauges()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay): the next requests compute their prompts."""
        self.block_manager.reset_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.sequences)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.preempted:
            metrics.num_preemptions.inc(len(batch.preempted))
        if batch.prefix_queries:
            metrics.prefix_cache_queries.inc(batch.prefix_queries)
            metrics.prefix_cache_hits.inc(batch.prefix_hits)
        if batch.is_empty:
            self._update_gauges()
            return []
        if batch.decodes:
            metrics.spec_tree_budget.set(sum(s.num_new_tokens for s in batch.decodes) / len(batch.decodes))
        shape = (batch.num_tokens, batch.keys_read, batch.num_trees, batch.num_drafts)
        started = time.perf_counter()
        try:
            results = self.runner.execute(batch)
        except Exception as e:  # a failed step fails its requests, not the server
            logger.exception("step failed")
            return self._fail(batch, f"internal error while running the model: {e}")
        elapsed = time.perf_counter() - started
        self.cost_model.observe(*shape, elapsed)
        metrics.step_duration.observe(elapsed)
        now = time.monotonic()
        outputs = []
        for item, result in results:
            seq = item.seq
            seq.num_cached_tokens = result.num_cached_tokens
            if item.is_prefill:
                metrics.prompt_tokens.inc(item.num_new_tokens)
            else:
                self._record_speculation(seq, item, result)
            seq.draft = result.draft
            if result.prompt_logprobs:
                seq.prompt_logprobs += result.prompt_logprobs
            if result.verdicts:
                self.policy.record_verdicts(seq, item.tree.probes, result.verdicts)
            if not result.new_token_ids:
                self.scheduler.cache_blocks(seq)
                continue
            if seq.params.max_tokens == 0:   # a prompt to score: it ends with its prefill
                appended, text, kept = [], "", 0
                seq.finish_reason = "length"
            else:
                appended, text, kept = self.output_processor.append(seq, result.new_token_ids)
            self.scheduler.cache_blocks(seq)   # before a finished sequence's blocks go
            self.policy.score(seq)
            self._record_timing(seq, len(appended), now)
            if seq.finish_reason is not None:
                self._finish(seq, now)
            else:
                self.block_manager.shrink(seq.block_table, seq.num_cached_tokens)
            logprobs = None if result.logprobs is None else tuple(result.logprobs[:kept])
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None   # with the first output only
            outputs.append(RequestOutput(seq.request_id, text, appended, seq.finish_reason,
                                         seq.num_prompt_tokens, seq.num_output_tokens,
                                         error=seq.error, num_cached_tokens=seq.num_prompt_cache_hits, logprobs=logprobs,
                                         prompt_logprobs=None if prompt_logprobs is None else tuple(prompt_logprobs)))
        self._update_gauges()
        return outputs

    # ---- bookkeeping -------------------------------------------------------------------
    def _record_speculation(self, seq: Sequence, item: ScheduledSequence, result: StepResult) -> None:
        """The heads' skill counts their own branch only; the metrics count the whole tree."""
        nodes, accepted, heads = item.num_new_tokens, result.accepted, len(item.tree.head_paths)
        if heads:  # before the skill moves: the plan used the skill it has now
            self.policy.record_tree(seq.spec.skill * item.tree.expected, result.head_accepted)
        seq.spec.record(accepted, nodes - 1, item.tree.expected, result.head_accepted, heads)
        if heads:
            self.skill_prior = max(SKILL_PRIOR_FLOOR, 0.95 * self.skill_prior + 0.05 * seq.spec.skill)
            self.policy.typical_skill = min(1.0, self.skill_prior)
        metrics.spec_steps.inc()
        metrics.spec_draft_tokens.inc(nodes - 1)
        metrics.spec_accepted_tokens.inc(accepted)
        for depth in range(1, accepted + 1):
            metrics.spec_accepted_per_position.labels(str(depth)).inc()

    def _record_timing(self, seq: Sequence, count: int, now: float) -> None:
        metrics.generation_tokens.inc(count)
        if seq.first_token_time is None:
            seq.first_token_time = now
            metrics.time_to_first_token.observe(now - seq.arrival_time)
            metrics.request_queue_time.observe((seq.first_scheduled_time or now) - seq.arrival_time)
        elif seq.last_token_time is not None and count:
            gap = (now - seq.last_token_time) / count
            for _ in range(count):
                metrics.inter_token_latency.observe(gap)
        seq.last_token_time = now

    def _finish(self, seq: Sequence, now: float) -> None:
        self.scheduler.remove(seq)
        self.sequences.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        metrics.requests.labels(seq.finish_reason, "ok" if seq.error is None else "error").inc()
        metrics.e2e_request_latency.observe(now - seq.arrival_time)

    def _fail(self, batch: SchedulerOutput, message: str) -> list[RequestOutput]:
        outputs = []
        for item in batch.prefills + batch.decodes:
            seq = item.seq
            seq.finish_reason = "error"
            self.scheduler.remove(seq)
            self.sequences.pop(seq.request_id, None)
            seq.status = SequenceStatus.FINISHED
            metrics.requests.labels("error", "error").inc()
            outputs.append(RequestOutput(seq.request_id, "", [], "error", seq.num_prompt_tokens,
                                         seq.num_output_tokens, error=message))
        self._update_gauges()
        return outputs

    def _update_gauges(self) -> None:
        metrics.num_requests_running.set(len(self.scheduler.running))
        metrics.num_requests_waiting.set(len(self.scheduler.waiting))
        metrics.kv_cache_usage.set(self.block_manager.usage)
