"""The generation engine: long-lived, keyed by request id, one mixed prefill/decode step at a time.

    add_request(id, request)   validate, queue (an unservable request gets its error at the next step)
    abort(ids)                 drop requests wherever they are, freeing their blocks
    step() -> results          schedule -> run the model on the plan -> sample -> update -> text/stops
    generate(requests)         a thin synchronous wrapper, for tests and benchmarks

One engine per model per process, with one KV-cache pool sized once from a byte budget. The engine
is not thread-safe: workers.runtime.engine_loop drives it from one thread and feeds it every shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import kernels
from workers.runtime.controls import ControlFactory
from workers.runtime.errors import (
    CacheTooSmallError,
    ContextLengthError,
    EngineFailure,
    GenerationFailedError,
    InvalidGenerationRequest,
    RequestFailure,
)
from workers.runtime.host_memory import keep_freed_memory
from workers.runtime.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, blocks_for
from workers.runtime.kv_cache_manager import KVCacheManager
from workers.runtime.model import ForwardBatch, Transformer
from workers.runtime.output_processor import OutputProcessor
from workers.runtime.scheduler import EngineRequest, ScheduledRequest, Scheduler, SchedulerConfig, StepPlan
from workers.runtime.tokenizer import Tokenizer
from workers.runtime.types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

_SEED_MODULUS = 2**32  # kernels.sample takes seeds in [0, 2**32)


@dataclass
class EngineConfig:
    kv_cache_bytes: int = 1 << 30  # K and V of every layer; the pool is sized from this once
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 256
    max_step_tokens: int = 2048
    enable_prefix_caching: bool = True


@dataclass
class EngineStats:
    """What the engine holds and has done, for progress displays and metrics."""

    running: int
    waiting: int
    kv_blocks: int
    kv_usage: float  # share of the pool held by requests
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens admitted
    preemptions: int
    steps: int
    generated_tokens: int


def _common_prefix_length(tables: list[list[int]], limit: int) -> int:
    """How many leading block ids all tables share (at most limit): blocks of one cached prompt prefix."""
    if len(tables) < 2:
        return 0
    first = tables[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in tables):
        n += 1
    return n


def _is_systemic(exc: BaseException) -> bool:
    """Out of memory (host or device) is about the worker, not a request."""
    return isinstance(exc, MemoryError | torch.OutOfMemoryError)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, context_length: int, cache_key: str,
                 config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.cache_key = cache_key  # the model's id: adapter ids are appended per request
        self.config = config = config or EngineConfig()
        c = model.config
        param = model.tok_embeddings.weight
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            keep_freed_memory()
        self.vocab_size = c.vocab_size
        self.block_size = config.block_size
        bytes_per_block = 2 * c.n_layers * config.block_size * c.n_kv_heads * c.head_dim * param.element_size()
        num_blocks = max(1, config.kv_cache_bytes // bytes_per_block)
        self.cache = KVCache(c, num_blocks, config.block_size, self.device, self.dtype)
        self.kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_step_tokens), self.kv,
                                   frozenset(tokenizer.special.eos_ids))
        self.outputs = OutputProcessor(tokenizer)
        self.controls = ControlFactory(tokenizer, c.vocab_size)
        self._refused: dict[str, GenerationResult] = {}  # requests that could not run, reported next step
        self.steps = 0
        self.generated_tokens = 0

    # -- requests in and out -----------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raises a RequestFailure for a request that cannot run here."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidGenerationRequest("the prompt is empty")
        if request.params.max_tokens < 1:
            raise InvalidGenerationRequest("max_tokens must be at least 1")
        if len(prompt) + request.params.max_tokens > self.context_length:
            raise ContextLengthError(len(prompt), request.params.max_tokens, self.context_length)
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidGenerationRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        tokens = len(prompt) + request.params.max_tokens
        if blocks_for(tokens, self.block_size) > self.kv.pool.num_blocks:
            raise CacheTooSmallError(tokens, self.kv.pool.num_blocks * self.block_size)

    def _control_processors(self, request: GenerationRequest) -> list:
        try:
            return self.controls.processors(request.controls)  # type: ignore[arg-type]
        except (RuntimeError, ValueError) as exc:  # a schema xgrammar cannot compile
            raise InvalidGenerationRequest(f"the output controls cannot be built: {exc}") from exc
        except Exception as exc:  # a bug in a processor: this request's error, not the engine's
            log.exception("building the output controls of %s failed", request.request_id)
            raise InvalidGenerationRequest(f"the output controls cannot be built: {type(exc).__name__}") from exc

    def add_request(self, request_id: str, request: GenerationRequest) -> None:
        """Queues a request under the engine's id request_id (unique among what the engine holds)."""
        try:
            self.validate(request)
            if request.controls is not None and request.controls.any():
                request = replace(request, logits_processors=[*request.logits_processors,
                                                              *self._control_processors(request)])
        except RequestFailure as e:
            self._refused[request_id] = GenerationResult(
                request_id=request.request_id, text="", token_ids=[], finish_reason="length",
                prompt_tokens=len(request.prompt_token_ids), completion_tokens=0, error=e)
            return
        cache_key = self.cache_key if request.adapter_id is None else f"{self.cache_key}+{request.adapter_id}"
        self.scheduler.add(EngineRequest(request_id, request, cache_key))
        self.outputs.add(request_id, request)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.finish(request_id)
            self.outputs.drop(request_id)
            self._refused.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._refused)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_blocks=self.kv.pool.num_blocks,
                           kv_usage=self.kv.usage, prefix_hit_rate=self.kv.hit_rate, preemptions=s.num_preemptions,
                           steps=self.steps, generated_tokens=self.generated_tokens)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> dict[str, GenerationResult]:
        """One step; returns engine request id -> result for every request that finished in it."""
        finished, self._refused = self._refused, {}
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return finished
        try:
            sampled = self._run(plan)
        except Exception as exc:
            if _is_systemic(exc):
                raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc
            if not plan.isolated:
                log.warning("a step of %d requests failed (%s: %s); running them one at a time",
                            len(plan.scheduled), type(exc).__name__, exc)
                self.scheduler.make_suspects(plan)
                return finished
            [only] = plan.scheduled
            request = only.request
            log.warning("request %s fails alone: %s: %s", request.request_id, type(exc).__name__, exc)
            self.abort([request.request_id])
            finished[request.request_id] = GenerationResult(
                request_id=request.request.request_id, text="", token_ids=[], finish_reason="length",
                prompt_tokens=request.num_prompt_tokens, completion_tokens=0,
                error=GenerationFailedError(f"the model failed on this request: {type(exc).__name__}: {exc}"))
            return finished
        self.steps += 1
        self.generated_tokens += len(sampled)
        events = self.scheduler.update(plan, sampled)
        done, stopped = self.outputs.process(events)
        for request_id in stopped:  # a stop string: the scheduler still holds them
            self.scheduler.finish(request_id, "stop")
        finished.update(done)
        return finished

    def generate(self, requests: list[GenerationRequest],
                 on_result: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Every request's result, in request order (errors included); steps until all have finished."""
        ids = [f"generate-{i}" for i in range(len(requests))]
        for request_id, request in zip(ids, requests, strict=True):
            self.add_request(request_id, request)
        results: dict[str, GenerationResult] = {}
        pending = set(ids)
        try:
            while pending:
                for request_id, result in self.step().items():
                    if request_id in pending:
                        pending.discard(request_id)
                        results[request_id] = result
                        if on_result is not None:
                            on_result(result)
        finally:
            self.abort(list(pending))
        return [results[i] for i in ids]

    # -- running a plan --------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, plan: StepPlan) -> dict[str, tuple[int, float | None]]:
        """Runs the model on the plan and draws a token for each request whose step reaches its end."""
        # Decode rows (one new token) first: the model runs them through decode attention in one call.
        rows = sorted(plan.scheduled, key=lambda s: s.num_new != 1)
        num_decodes = sum(1 for s in rows if s.num_new == 1)
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        cu = [0]
        logits_rows: list[int] = []  # index into tokens of each sampling row's last token
        sampling: list[ScheduledRequest] = []
        for i, s in enumerate(rows):
            request = s.request
            blocks = self.kv.blocks_of(request.request_id)
            start, end = s.num_computed, s.num_computed + s.num_new
            tokens.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            tables.append(blocks)
            seq_lens.append(end)
            if i >= num_decodes:
                cu.append(cu[-1] + s.num_new)
            if s.samples:
                logits_rows.append(len(tokens) - 1)
                sampling.append(s)
        width = max(len(t) for t in tables)
        dev = self.device
        # Blocks every decode (or prefill) row holds before its new tokens: attended once for all (cascade).
        decode_shared = _common_prefix_length(tables[:num_decodes],
                                              (min(seq_lens[:num_decodes], default=1) - 1) // bs)
        prefill_shared = _common_prefix_length(tables[num_decodes:], min(
            (s.num_computed // bs for s in rows[num_decodes:]), default=0))
        batch = ForwardBatch(
            tokens=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            num_decodes=num_decodes,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev) if len(cu) > 1 else None,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            max_decode_len=max(seq_lens[:num_decodes], default=None),
            decode_shared_blocks=decode_shared,
            prefill_shared_blocks=prefill_shared,
            max_prefill_new=max((s.num_new for s in rows[num_decodes:]), default=None),
        )
        logits = self.model(batch, self.cache)  # [len(sampling), V] fp32
        if not sampling:
            return {}
        for row, s in enumerate(sampling):
            for processor in s.request.request.logits_processors:
                processor(s.request.output_token_ids, logits[row])
        token_ids, logprobs = kernels.sample(logits, self._sampling_metadata(sampling))
        token_list = token_ids.tolist()
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(token_list)
        return {s.request.request_id: (t, lp) for s, t, lp in zip(sampling, token_list, logprob_list, strict=True)}

    def _sampling_metadata(self, rows: list[ScheduledRequest]) -> kernels.SamplingMetadata:
        """Per-row parameters; output_counts/prompt_mask only when some row has a penalty."""
        dev = self.device
        requests = [s.request for s in rows]
        params = [r.request.params for r in requests]

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        meta = kernels.SamplingMetadata(
            temperature=col([p.temperature for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.int32),
            top_p=col([p.top_p for p in params], torch.float32),
            min_p=col([p.min_p for p in params], torch.float32),
            presence_penalty=col([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
            repetition_penalty=col([p.repetition_penalty for p in params], torch.float32),
            seed=col([(p.seed or 0) % _SEED_MODULUS for p in params], torch.int64),
            position=col([len(r.token_ids) for r in requests], torch.int32),  # index of the token being drawn
            want_logprobs=any(p.logprobs for p in params),
        )
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            shape = (len(rows), self.vocab_size)
            out_rows = [row for row, r in enumerate(requests) for _ in range(r.num_output_tokens)]
            meta.output_counts = torch.zeros(shape, dtype=torch.int32, device=dev)
            meta.output_counts.index_put_(
                (col(out_rows, torch.int64), col([t for r in requests for t in r.output_token_ids], torch.int64)),
                torch.ones(len(out_rows), dtype=torch.int32, device=dev), accumulate=True)
            prompt_rows = [row for row, r in enumerate(requests) for _ in range(r.num_prompt_tokens)]
            meta.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=dev)
            meta.prompt_mask[col(prompt_rows, torch.int64),
                             col([t for r in requests for t in r.request.prompt_token_ids], torch.int64)] = True
        return meta
