"""Batched generation over the paged KV cache: admit, prefill packed prompts, decode, retire.

One `generate` call runs a small continuous-batching loop (vLLM's shape, sized for us):
    while work: admit waiting requests that fit (batch slots, KV blocks, prefill token budget);
                if any were admitted, prefill them packed (varlen) and draw their first token,
                else decode one token for every running sequence;
                retire finished sequences (free their blocks, call on_result).
Each request reserves blocks for prompt + max_tokens when admitted, so nothing is ever preempted.
Sampling is `kernels.sample` with noise keyed on (seed, position): a request draws the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import kernels
from workers.runtime.errors import ContextLengthError
from workers.runtime.kv_cache import DEFAULT_BLOCK_SIZE, BlockAllocator, KVCache, block_table_tensor, blocks_for
from workers.runtime.model import ForwardBatch, Transformer
from workers.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.runtime.types import GenerationRequest, GenerationResult

MAX_PREFILL_TOKENS = 8192  # packed prompt tokens per prefill step (bounds activation memory)
_SEED_MODULUS = 2**32  # kernels.sample takes seeds in [0, 2**32)


@dataclass
class _Sequence:
    """A request being generated: its tokens, text so far and cache blocks."""

    index: int  # position of the request in the caller's list
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    blocks: list[int] = field(default_factory=list)  # KV cache blocks, in sequence order
    generated: list[int] = field(default_factory=list)  # completion token ids
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # completed characters of the completion (stop string cut off at the end)
    finish_reason: str | None = None  # "stop" or "length" once finished

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt + completion)."""
        return len(self.request.prompt_token_ids) + len(self.generated)

    @property
    def last_token(self) -> int:
        return self.generated[-1]


def _wants_penalties(request: GenerationRequest) -> bool:
    p = request.params
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


@dataclass
class _BatchTensors:
    """Device tensors of one batch composition, kept from step to step while its rows stay the same."""

    rows: tuple[int, ...]  # _Sequence.index of each row
    block_tables: torch.Tensor  # [B, max_blocks] int32; a request's blocks are all reserved at admission
    # Per-row sampling parameters. position is replaced every step; output_counts (penalties only) is
    # incremented on the device with each step's tokens instead of being rebuilt from Python lists.
    meta: kernels.SamplingMetadata


class Generator:
    """Runs batches of GenerationRequest through one model; owns the KV cache between calls."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, context_length: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.block_size = block_size
        self.eos_ids = frozenset(tokenizer.special.eos_ids)
        param = model.tok_embeddings.weight
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model.config.vocab_size
        self._cache: KVCache | None = None
        self._batch: _BatchTensors | None = None  # the last step's, within one call (rows are unique there)
        self._lock = threading.Lock()  # one generate at a time: they share the cache

    # -- validation ------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raises ContextLengthError or ValueError for a request that cannot run."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("the prompt is empty")
        if request.params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(prompt) + request.params.max_tokens > self.context_length:
            raise ContextLengthError(len(prompt), request.params.max_tokens, self.context_length)
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")

    def _blocks_needed(self, request: GenerationRequest) -> int:
        return blocks_for(len(request.prompt_token_ids) + request.params.max_tokens, self.block_size)

    def _ensure_cache(self, num_blocks: int) -> KVCache:
        """The cache, grown to num_blocks if smaller, with every block free (a call that raised leaves none)."""
        if self._cache is None or self._cache.allocator.num_blocks < num_blocks:
            self._cache = None  # free the old pool before allocating the new one
            self._cache = KVCache(self.model.config, num_blocks, self.block_size, self.device, self.dtype)
        self._cache.allocator = BlockAllocator(self._cache.allocator.num_blocks)
        return self._cache

    # -- the loop --------------------------------------------------------------------------------

    def generate(
        self, requests: list[GenerationRequest],
        on_result: Callable[[GenerationResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_batch_size: int = 32,
    ) -> list[GenerationResult]:
        """Results of the requests that finished, in request order.

        A request that cannot run (prompt + max_tokens beyond the context, empty prompt) gets a
        result with `error` set and no tokens; the others run. `should_stop()` is polled between
        steps: when it returns True, generation ends and unfinished requests get no result.
        `on_result` is called as each request finishes (errors included). Calls are serialised.
        """
        with self._lock:
            try:
                return self._generate(requests, on_result, should_stop, max(1, max_batch_size))
            finally:
                self._batch = None

    def _generate(
        self, requests: list[GenerationRequest], on_result: Callable[[GenerationResult], None] | None,
        should_stop: Callable[[], bool] | None, max_batch_size: int,
    ) -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}

        def finish(index: int, result: GenerationResult) -> None:
            results[index] = result
            if on_result is not None:
                on_result(result)

        waiting: deque[_Sequence] = deque()
        for index, request in enumerate(requests):
            try:
                self.validate(request)
            except ValueError as e:  # ContextLengthError is a ValueError
                finish(index, GenerationResult(
                    request_id=request.request_id, text="", token_ids=[], finish_reason="length",
                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=0, error=str(e),
                ))
                continue
            waiting.append(_Sequence(index=index, request=request, detokenizer=self.tokenizer.detokenizer()))
        if not waiting:
            return [results[i] for i in sorted(results)]

        # Enough blocks for the max_batch_size largest requests: any admissible set fits.
        needs = sorted((self._blocks_needed(s.request) for s in waiting), reverse=True)
        cache = self._ensure_cache(sum(needs[:max_batch_size]))
        running: list[_Sequence] = []
        while waiting or running:
            if should_stop is not None and should_stop():
                break
            admitted: list[_Sequence] = []
            budget = MAX_PREFILL_TOKENS
            while waiting and len(running) + len(admitted) < max_batch_size:
                seq = waiting[0]
                prompt_len = len(seq.request.prompt_token_ids)
                need = self._blocks_needed(seq.request)
                if need > cache.allocator.num_free or (admitted and prompt_len > budget):
                    break
                waiting.popleft()
                seq.blocks = cache.allocator.allocate(need)
                budget -= prompt_len
                admitted.append(seq)
            if admitted:
                self._prefill(admitted, cache)
                running.extend(admitted)
                stepped = admitted
            else:
                self._decode(running, cache)
                stepped = running
            for seq in stepped:
                if seq.finish_reason is not None:
                    cache.allocator.free(seq.blocks)
                    finish(seq.index, self._result(seq))
            running = [s for s in running if s.finish_reason is None]
        if running:  # cancelled: give the blocks back
            for seq in running:
                cache.allocator.free(seq.blocks)
        return [results[i] for i in sorted(results)]

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Sequence], cache: KVCache) -> None:
        """Runs the packed prompts and draws each sequence's first completion token."""
        prompts = [s.request.prompt_token_ids for s in seqs]
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        positions = torch.cat([torch.arange(len(p), dtype=torch.int64) for p in prompts])
        tensors = self._batch_tensors(seqs)
        batch = ForwardBatch(
            tokens=torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=self.device),
            positions=positions.to(self.device),
            block_tables=tensors.block_tables,
            is_prefill=True,
            cu_seqlens=cu_seqlens.to(self.device),
            logits_indices=(cu_seqlens[1:] - 1).to(torch.int64).to(self.device),
            max_seq_len=max(len(p) for p in prompts),
        )
        logits = self.model(batch, cache)  # [B, V]
        self._sample_and_append(seqs, logits, tensors, position=lengths.to(self.device))

    @torch.inference_mode()
    def _decode(self, seqs: list[_Sequence], cache: KVCache) -> None:
        """One token for every sequence: feed each its last token at position length - 1."""
        bs = self.block_size
        positions = [s.length - 1 for s in seqs]
        slots = [s.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, positions, strict=True)]
        # [3, B] int64 rows: token, position, flat cache slot; one host-to-device copy per step.
        step = torch.tensor([[s.last_token for s in seqs], positions, slots], dtype=torch.int64).to(self.device)
        seq_lens = (step[1] + 1).to(torch.int32)  # also the position of the token being drawn
        tensors = self._batch_tensors(seqs)
        batch = ForwardBatch(
            tokens=step[0],
            positions=step[1],
            block_tables=tensors.block_tables,
            is_prefill=False,
            seq_lens=seq_lens,
            slot_mapping=step[2],
            max_seq_len=max(positions) + 1,
        )
        logits = self.model(batch, cache)  # [B, V]
        self._sample_and_append(seqs, logits, tensors, position=seq_lens)

    # -- sampling and stopping -------------------------------------------------------------------

    def _batch_tensors(self, seqs: list[_Sequence]) -> _BatchTensors:
        """The last step's tensors when `seqs` are the same rows, else new ones for this composition."""
        rows = tuple(s.index for s in seqs)
        if self._batch is None or self._batch.rows != rows:
            self._batch = _BatchTensors(rows, block_table_tensor([s.blocks for s in seqs], self.device),
                                        self._sampling_metadata(seqs))
        return self._batch

    def _sampling_metadata(self, seqs: list[_Sequence]) -> kernels.SamplingMetadata:
        """Per-row parameters; output_counts/prompt_mask only when some row has a penalty."""
        dev = self.device
        params = [s.request.params for s in seqs]

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
            position=col([s.length for s in seqs], torch.int32),  # index of the token being drawn
            want_logprobs=any(p.logprobs for p in params),
        )
        if any(_wants_penalties(s.request) for s in seqs):
            shape = (len(seqs), self.vocab_size)
            generated_rows = [row for row, s in enumerate(seqs) for _ in s.generated]
            meta.output_counts = torch.zeros(shape, dtype=torch.int32, device=dev)
            meta.output_counts.index_put_(
                (col(generated_rows, torch.int64), col([t for s in seqs for t in s.generated], torch.int64)),
                torch.ones(len(generated_rows), dtype=torch.int32, device=dev), accumulate=True,
            )
            prompt_rows = [row for row, s in enumerate(seqs) for _ in s.request.prompt_token_ids]
            meta.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=dev)
            meta.prompt_mask[col(prompt_rows, torch.int64),
                             col([t for s in seqs for t in s.request.prompt_token_ids], torch.int64)] = True
        return meta

    def _sample_and_append(self, seqs: list[_Sequence], logits: torch.Tensor, tensors: _BatchTensors,
                           position: torch.Tensor) -> None:
        """Draws a token per row (position [B] int32: its index in the sequence) and applies the stop rules."""
        meta = tensors.meta
        meta.position = position
        tokens, logprobs = kernels.sample(logits, meta)
        if meta.output_counts is not None:
            meta.output_counts[torch.arange(len(seqs), device=tokens.device), tokens] += 1
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist() if logprobs is not None else None
        for row, (seq, token) in enumerate(zip(seqs, token_list, strict=True)):
            seq.generated.append(token)
            if seq.request.params.logprobs and logprob_list is not None:
                seq.logprobs.append(logprob_list[row])
            self._check_stop(seq, token)

    def _check_stop(self, seq: _Sequence, token: int) -> None:
        """Sets finish_reason on eos, on a stop string (cut from the text), or at max_tokens."""
        params = seq.request.params
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
            return
        before = len(seq.text)
        seq.text += seq.detokenizer.push(token)
        if params.stop and len(seq.text) > before:
            # A stop string ending in the new text starts at most len(stop) - 1 characters earlier.
            start = max(0, before - max(len(s) for s in params.stop) + 1)
            hits = [i for i in (seq.text.find(s, start) for s in params.stop if s) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                seq.finish_reason = "stop"
                return
        if len(seq.generated) >= params.max_tokens:
            seq.finish_reason = "length"

    def _result(self, seq: _Sequence) -> GenerationResult:
        return GenerationResult(
            request_id=seq.request.request_id,
            text=seq.text,
            token_ids=list(seq.generated),
            finish_reason=seq.finish_reason,  # type: ignore[arg-type]
            prompt_tokens=len(seq.request.prompt_token_ids),
            completion_tokens=len(seq.generated),
            logprobs=list(seq.logprobs) if seq.request.params.logprobs else None,
        )
