"""Fused sampling over a batch of logits rows.

Order of operations (vLLM's): repetition penalty -> frequency/presence penalties -> temperature
-> min-p -> top-k -> top-p -> Gumbel-max draw with counter-based noise keyed on
(seed, position, vocabulary index). Greedy rows (temperature 0) take the argmax, ties to the
lowest index. Logprobs, when asked for, are the raw model log-softmax of the chosen token.

Every filter keeps an upper set of the row's values, so the kept set is {x >= threshold}. The
Triton kernel finds each threshold without sorting: a k-ary search over the order-preserving int32
keys of the float values, each step one pass over the row that also snaps the bounds onto row
values, ends on an exact row value after a few passes (ties at the boundary are kept, as in the
sort-based reference). One launch per step; one program handles
ROWS rows and loops over the vocabulary in BLOCK_V tiles.

File order: the Triton kernel, its launcher `sample_triton`, then `sample_reference`, which is both
the CPU path and the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.philox import philox_randint, philox_uniform

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference below is the whole sampler
    triton = None

# u is clamped into [_MIN_UNIFORM, _MAX_UNIFORM] so that g = -log(-log(u)) stays finite: away from 0
# (vLLM's bound), and below 1, which rand returns when its int32 rounds up to 2**31 in float32 (a
# chance of 3e-8 per entry that would give g = +inf, a token drawn uniformly from the whole vocabulary).
_MIN_UNIFORM = 4.66e-10
_MAX_UNIFORM = 1.0 - 2.0**-24  # the largest float32 below 1
# So g lies in [_GUMBEL_LOW, _GUMBEL_HIGH] = [-3.07, 16.64], and a token whose scaled logit is below the
# row's best by more than the spread can never win the argmax (the margin covers float32 rounding).
_GUMBEL_LOW = -math.log(-math.log(_MIN_UNIFORM))
_GUMBEL_HIGH = -math.log(-math.log(_MAX_UNIFORM))
_GUMBEL_SPREAD = _GUMBEL_HIGH - _GUMBEL_LOW + 1.0


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters for one decode step; every tensor has B rows, on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 means greedy
    top_k: torch.Tensor  # [B] int32; 0 means off
    top_p: torch.Tensor  # [B] float32; 1.0 means off
    min_p: torch.Tensor  # [B] float32; 0.0 means off
    presence_penalty: torch.Tensor  # [B] float32; 0.0 means off
    frequency_penalty: torch.Tensor  # [B] float32; 0.0 means off
    repetition_penalty: torch.Tensor  # [B] float32; 1.0 means off
    seed: torch.Tensor  # [B] int64, each in [0, 2**32)
    position: torch.Tensor  # [B] int32; index of the token being drawn in its sequence
    output_counts: torch.Tensor | None = None  # [B, V] int32 occurrences in the generated tokens
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in the prompt
    want_logprobs: bool = False  # also return the chosen tokens' logprobs

    def select(self, index: torch.Tensor) -> SamplingMetadata:
        """The metadata of rows `index` (a [n] index tensor or bool mask), in that order."""
        return SamplingMetadata(**{k: v[index] if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


if triton is not None:

    @triton.jit
    def _float_key(x):
        """Order-preserving int32 key of fp32 x (-0.0 folded onto +0.0 so that equal floats tie)."""
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _gumbel(row_key, idx):
        """g = -log(-log(u)), u = rand(row_key, vocab index), as _gumbel_reference."""
        u = tl.rand(row_key[:, None], idx)  # [ROWS, BLOCK_V]
        u = tl.minimum(tl.maximum(u, 4.66e-10), 0.99999994)  # _MIN_UNIFORM, _MAX_UNIFORM
        return -tl.log(-tl.log(u))

    @triton.jit
    def _sample_kernel(
        logits_ptr,  # [B, V] fp32/bf16/fp16, row stride stride_logits, unit column stride
        work_ptr,  # [B, V] fp32 scratch: processed logits of rows that filter (contiguous)
        temperature_ptr,  # [B] fp32
        top_k_ptr,  # [B] int32
        top_p_ptr,  # [B] fp32
        min_p_ptr,  # [B] fp32
        presence_ptr,  # [B] fp32
        frequency_ptr,  # [B] fp32
        repetition_ptr,  # [B] fp32
        seed_ptr,  # [B] int64
        position_ptr,  # [B] int32
        counts_ptr,  # [B, V] int32 (contiguous); read only when has_penalties
        prompt_ptr,  # [B, V] uint8 (contiguous); read only when has_penalties
        tokens_ptr,  # [B] int64 out
        logprobs_ptr,  # [B] fp32 out: raw log-softmax of the chosen token
        n_rows,
        vocab,
        stride_logits,
        has_penalties,  # 0/1
        ROWS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        NSPLIT: tl.constexpr,  # thresholds tried per search step (the search is NSPLIT-ary)
        STORE_FILTERED: tl.constexpr,  # test hook: leave every sampled row's filtered logits in work
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [R]
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_V)  # [BV]
        split = tl.arange(0, NSPLIT)  # [N]

        temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
        greedy = temperature <= 0.0
        t_eff = tl.where(greedy, 1.0, temperature)
        top_k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
        top_p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
        min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
        sampled = row_ok & ~greedy
        has_topk = sampled & (top_k > 0) & (top_k < vocab)
        has_topp = sampled & (top_p < 1.0)
        has_minp = sampled & (min_p > 0.0)
        filtered = has_topk | has_topp | has_minp
        plain = sampled & ~filtered
        min_p = tl.where(has_minp, min_p, 0.0)
        k_eff = tl.where(has_topk, top_k, 0)
        seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
        position = tl.load(position_ptr + rows, mask=row_ok, other=0)
        row_key = tl.randint(seed, position)  # [R] uint32
        any_plain = tl.max(plain.to(tl.int32), axis=0) > 0
        any_filtered = tl.max(filtered.to(tl.int32), axis=0) > 0
        if STORE_FILTERED:
            stored = sampled
        else:
            stored = filtered
        any_stored = tl.max(stored.to(tl.int32), axis=0) > 0
        presence = tl.load(presence_ptr + rows, mask=row_ok, other=0.0)
        frequency = tl.load(frequency_ptr + rows, mask=row_ok, other=0.0)
        repetition = tl.load(repetition_ptr + rows, mask=row_ok, other=1.0)

        # Pass 1: penalties and temperature; raw log-sum-exp (logprobs); max, min and argmax of the
        # processed logits x (greedy rows); the Gumbel draw of unfiltered rows; x of filtered rows
        # to the scratch buffer for the threshold searches.
        raw_max = tl.full([ROWS], float("-inf"), tl.float32)
        raw_sum = tl.zeros([ROWS], tl.float32)
        x_max = tl.full([ROWS], float("-inf"), tl.float32)
        x_min = tl.full([ROWS], float("inf"), tl.float32)
        x_arg = tl.zeros([ROWS], tl.int32)
        best = tl.full([ROWS], float("-inf"), tl.float32)  # max of x + g over kept tokens
        best_arg = tl.zeros([ROWS], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            mask = row_ok[:, None] & (idx < vocab)[None, :]  # [R, BV]
            raw = tl.load(
                logits_ptr + rows64[:, None] * stride_logits + idx[None, :], mask=mask, other=float("-inf")
            ).to(tl.float32)
            new_max = tl.maximum(raw_max, tl.max(raw, axis=1))
            raw_sum = raw_sum * tl.exp(raw_max - new_max) + tl.sum(tl.exp(raw - new_max[:, None]), axis=1)
            raw_max = new_max
            x = raw
            if has_penalties:
                offs = rows64[:, None] * vocab + idx[None, :]
                count = tl.load(counts_ptr + offs, mask=mask, other=0)
                in_prompt = tl.load(prompt_ptr + offs, mask=mask, other=0)
                rep = repetition[:, None]
                penalised = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)
                x = tl.where((count > 0) | (in_prompt != 0), penalised, x)
                x = x - frequency[:, None] * count.to(tl.float32)
                x = x - presence[:, None] * (count > 0).to(tl.float32)
            x = tl.math.div_rn(x, t_eff[:, None])
            x = tl.where(mask, x, float("-inf"))
            tile_max = tl.max(x, axis=1)
            x_arg = tl.where(tile_max > x_max, start + tl.argmax(x, axis=1), x_arg)
            x_max = tl.maximum(x_max, tile_max)
            x_min = tl.minimum(x_min, tl.min(tl.where(mask, x, float("inf")), axis=1))
            if any_plain:
                score = tl.where(mask & plain[:, None], x + _gumbel(row_key, idx[None, :]), float("-inf"))
                tile_best = tl.max(score, axis=1)
                best_arg = tl.where(tile_best > best, start + tl.argmax(score, axis=1), best_arg)
                best = tl.maximum(best, tile_best)
            if any_stored:
                tl.store(work_ptr + rows64[:, None] * vocab + idx[None, :], x, mask=mask & stored[:, None])

        # Both searches try NSPLIT thresholds from lo to hi inclusive per pass, then snap the new bounds
        # onto row keys, so a search ends as soon as its interval holds one distinct value, usually
        # after a few passes rather than 32 / log2(NSPLIT - 1).
        tl.static_assert(NSPLIT >= 3)
        last = (split == NSPLIT - 1)[None, :]  # [1, N]

        # Top-k: the k-th largest value is the largest key t with count(key >= t) >= k.
        # Invariant: lo and hi - 1 are row keys, count(key >= lo) >= k > count(key >= hi).
        lo = tl.where(has_topk, _float_key(x_min).to(tl.int64), 0)
        hi = tl.where(has_topk, _float_key(x_max).to(tl.int64) + 1, 1)
        if tl.max(has_topk.to(tl.int32), axis=0) > 0:
            while tl.max(hi - lo, axis=0) > 1:
                thr = lo[:, None] + ((hi - lo)[:, None] * split[None, :]) // (NSPLIT - 1)  # [R, N]
                thr32 = thr.to(tl.int32)
                count_ge = tl.zeros([ROWS, NSPLIT], tl.int32)
                min_ge = tl.full([ROWS, NSPLIT], 2147483647, tl.int32)  # smallest key >= thr
                max_lt = tl.full([ROWS, NSPLIT], -2147483648, tl.int32)  # largest key < thr
                for start in range(0, vocab, BLOCK_V):
                    idx = start + cols
                    mask = has_topk[:, None] & (idx < vocab)[None, :]
                    x = tl.load(work_ptr + rows64[:, None] * vocab + idx[None, :], mask=mask, other=float("-inf"))
                    key = _float_key(x)[:, :, None]  # [R, BV, 1]
                    valid = mask[:, :, None]
                    ge = key >= thr32[:, None, :]  # [R, BV, N]
                    count_ge += tl.sum((ge & valid).to(tl.int32), axis=1)
                    min_ge = tl.minimum(min_ge, tl.min(tl.where(ge & valid, key, 2147483647), axis=1))
                    max_lt = tl.maximum(max_lt, tl.max(tl.where(~ge & valid, key, -2147483648), axis=1))
                ok = (count_ge >= k_eff[:, None]) & ~last  # true at thr = lo, false at thr = hi
                new_lo = tl.max(tl.where(ok, min_ge, -2147483648), axis=1).to(tl.int64)
                new_hi = tl.min(tl.where(ok, 2147483647, max_lt), axis=1).to(tl.int64) + 1
                lo = tl.where(has_topk, new_lo, lo)
                hi = tl.where(has_topk, new_hi, hi)
        kth_key = tl.where(has_topk, lo, -(2**31)).to(tl.int32)

        # Top-p over the tokens min-p and top-k kept, renormalised: the cut is the smallest key t
        # with mass(key > t) < p * mass(kept); every token >= the cut is kept.
        # Invariant: hi is a kept key, mass(key > lo) >= p * total > mass(key > hi).
        lo = tl.where(has_topp, _float_key(x_min).to(tl.int64) - 1, 0)
        hi = tl.where(has_topp, _float_key(x_max).to(tl.int64), 1)
        if tl.max(has_topp.to(tl.int32), axis=0) > 0:
            total = tl.zeros([ROWS], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                mask = has_topp[:, None] & (idx < vocab)[None, :]
                x = tl.load(work_ptr + rows64[:, None] * vocab + idx[None, :], mask=mask, other=float("-inf"))
                e = tl.exp(x - x_max[:, None])
                kept = mask & (e >= min_p[:, None]) & (_float_key(x) >= kth_key[:, None])
                total += tl.sum(tl.where(kept, e, 0.0), axis=1)
            target = top_p * total
            first = (split == 0)[None, :]
            while tl.max(hi - lo, axis=0) > 1:
                thr = lo[:, None] + ((hi - lo)[:, None] * split[None, :]) // (NSPLIT - 1)
                thr32 = thr.to(tl.int32)
                mass_gt = tl.zeros([ROWS, NSPLIT], tl.float32)
                min_gt = tl.full([ROWS, NSPLIT], 2147483647, tl.int32)  # smallest kept key > thr
                max_le = tl.full([ROWS, NSPLIT], -2147483648, tl.int32)  # largest kept key <= thr
                for start in range(0, vocab, BLOCK_V):
                    idx = start + cols
                    mask = has_topp[:, None] & (idx < vocab)[None, :]
                    x = tl.load(work_ptr + rows64[:, None] * vocab + idx[None, :], mask=mask, other=float("-inf"))
                    e = tl.exp(x - x_max[:, None])
                    key = _float_key(x)
                    kept = (mask & (e >= min_p[:, None]) & (key >= kth_key[:, None]))[:, :, None]
                    key = key[:, :, None]
                    gt = key > thr32[:, None, :]  # [R, BV, N]
                    mass_gt += tl.sum(tl.where(gt & kept, e[:, :, None], 0.0), axis=1)
                    min_gt = tl.minimum(min_gt, tl.min(tl.where(gt & kept, key, 2147483647), axis=1))
                    max_le = tl.maximum(max_le, tl.max(tl.where(~gt & kept, key, -2147483648), axis=1))
                below = ((mass_gt < target[:, None]) & ~first) | last  # false at thr = lo, true at thr = hi
                new_lo = tl.max(tl.where(below, -2147483648, min_gt), axis=1).to(tl.int64) - 1
                new_hi = tl.min(tl.where(below, max_le, 2147483647), axis=1).to(tl.int64)
                lo = tl.where(has_topp, new_lo, lo)
                hi = tl.where(has_topp, new_hi, hi)
        cut_key = tl.where(has_topp, hi, -(2**31)).to(tl.int32)

        # Gumbel-max over the kept tokens of filtered rows.
        if any_filtered:
            for start in range(0, vocab, BLOCK_V):
                idx = start + cols
                mask = filtered[:, None] & (idx < vocab)[None, :]
                x = tl.load(work_ptr + rows64[:, None] * vocab + idx[None, :], mask=mask, other=float("-inf"))
                key = _float_key(x)
                kept = mask & (tl.exp(x - x_max[:, None]) >= min_p[:, None])
                kept = kept & (key >= kth_key[:, None]) & (key >= cut_key[:, None])
                score = tl.where(kept, x + _gumbel(row_key, idx[None, :]), float("-inf"))
                if STORE_FILTERED:
                    tl.store(
                        work_ptr + rows64[:, None] * vocab + idx[None, :], tl.where(kept, x, float("-inf")), mask=mask
                    )
                tile_best = tl.max(score, axis=1)
                best_arg = tl.where(tile_best > best, start + tl.argmax(score, axis=1), best_arg)
                best = tl.maximum(best, tile_best)

        token = tl.where(greedy, x_arg, best_arg)
        chosen = tl.load(logits_ptr + rows64 * stride_logits + token, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)
        tl.store(logprobs_ptr + rows, chosen - raw_max - tl.log(raw_sum), mask=row_ok)


@dataclass(frozen=True)
class SamplingConfig:
    """Tile shape of one `_sample_kernel` launch (every CUDA config is compiled ahead of time by kernels.aot)."""

    rows: int  # logits rows per program
    block_v: int  # vocabulary tile
    nsplit: int  # thresholds tried per search step
    num_warps: int


# CUDA: one program per row, 1024-wide tiles; 8-ary search = 11 passes over an fp32 row per filter.
CUDA_SAMPLING_CONFIG = SamplingConfig(rows=1, block_v=1024, nsplit=8, num_warps=8)


def sampling_config(batch: int, vocab: int, device: torch.device) -> SamplingConfig:
    """The launch config on `device`: fixed on CUDA; in the CPU interpreter, whose cost is per operation
    rather than per element, as many rows per program as keep a search step's [rows, block_v, nsplit]
    tile near 2**20 elements."""
    if device.type == "cuda":
        return CUDA_SAMPLING_CONFIG
    block_v, nsplit = min(1024, triton.next_power_of_2(vocab)), 8
    rows = min(triton.next_power_of_2(batch), (1 << 20) // (block_v * nsplit), 4096)  # Triton's numel cap
    return SamplingConfig(rows=rows, block_v=block_v, nsplit=nsplit, num_warps=1)


def sample_triton(
    logits: torch.Tensor, meta: SamplingMetadata, *, config: SamplingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-launch sampler; same contract as `sample_reference`. logits: [B, V] fp32/bf16/fp16, unit column stride."""
    tokens, logprobs, _ = _launch_sample(logits, meta, config, store_filtered=False)
    return tokens, logprobs


def filtered_logits_triton(
    logits: torch.Tensor, meta: SamplingMetadata, *, config: SamplingConfig | None = None
) -> torch.Tensor:
    """Test hook: the kernel's penalised, temperature-scaled logits [B, V], -inf where filtered (sampled rows only)."""
    return _launch_sample(logits, meta, config, store_filtered=True)[2]


def _launch_sample(
    logits: torch.Tensor, meta: SamplingMetadata, config: SamplingConfig | None, *, store_filtered: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if triton is None:
        raise RuntimeError("sample_triton needs triton")
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if logits.dtype == torch.bfloat16 and not logits.is_cuda:
        logits = logits.float()  # the interpreter cannot do bf16 arithmetic
    device = logits.device
    config = config or sampling_config(batch, vocab, device)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    work = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    if meta.output_counts is not None:
        counts = meta.output_counts.to(torch.int32).contiguous()
        prompt = meta.prompt_mask if meta.prompt_mask is not None else torch.zeros_like(counts, dtype=torch.bool)
        prompt = prompt.contiguous().view(torch.uint8)
    else:  # never read; typed as the real ones so that both cases share one compiled kernel
        counts = torch.empty(0, dtype=torch.int32, device=device)
        prompt = torch.empty(0, dtype=torch.uint8, device=device)
    if batch == 0:
        return tokens, (logprobs if meta.want_logprobs else None), work
    f32 = torch.float32
    _sample_kernel[(triton.cdiv(batch, config.rows),)](
        logits, work,
        meta.temperature.to(f32), meta.top_k.to(torch.int32), meta.top_p.to(f32), meta.min_p.to(f32),
        meta.presence_penalty.to(f32), meta.frequency_penalty.to(f32), meta.repetition_penalty.to(f32),
        meta.seed.to(torch.int64), meta.position.to(torch.int32),
        counts, prompt, tokens, logprobs,
        batch, vocab, logits.stride(0), int(meta.output_counts is not None),
        ROWS=config.rows, BLOCK_V=config.block_v, NSPLIT=config.nsplit, STORE_FILTERED=store_filtered,
        num_warps=config.num_warps, enable_fp_fusion=False,  # no FMA: penalties round as the reference
    )  # fmt: skip
    return tokens, (logprobs if meta.want_logprobs else None), work


def apply_penalties_reference(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition, frequency and presence penalties (vLLM formulas) on fp32 logits [B, V]."""
    if meta.output_counts is None:
        return logits
    counts = meta.output_counts
    seen = counts > 0
    if meta.prompt_mask is not None:
        seen = seen | meta.prompt_mask
    rep = meta.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts.to(logits.dtype)
    logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


# The reference sorts only the top _TOP_P_PREFIX logits of a row (torch.topk), and falls back to a
# full sort when a row's top-p cut could lie beyond them: a full sort of a 49k vocabulary costs as
# much as a decode step of the 135M model on the CPU.
_TOP_P_PREFIX = 1024


def apply_top_k_top_p_min_p_reference(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Writes -inf into filtered entries of temperature-scaled logits [B, V] (sort-based, exact ties).

    Applied in turn, each on what the previous kept: min-p keeps p >= min_p * max p; top-k keeps every
    token whose logit is >= the k-th largest (ties at the boundary are kept); top-p keeps the smallest
    prefix of the sorted, renormalised distribution whose mass reaches p (the token that crosses p is
    kept, and so are its ties).
    """
    vocab = logits.shape[-1]
    x_max = logits.max(dim=-1, keepdim=True).values
    min_p = meta.min_p[:, None]
    top_k = meta.top_k.to(torch.int64)
    width = min(vocab, _TOP_P_PREFIX) if int(top_k.max()) <= _TOP_P_PREFIX else vocab
    while True:
        sorted_logits = torch.topk(logits, width, dim=-1).values  # [B, width], descending
        kth = sorted_logits.gather(-1, (top_k.clamp(min=1, max=width) - 1)[:, None])
        kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
        keep = (torch.exp(logits - x_max) >= min_p) & (logits >= kth)  # p / max p, as the kernel computes it
        # min-p and top-k both keep an upper set, so the survivors sorted are a prefix of sorted_logits.
        keep_sorted = (torch.exp(sorted_logits - x_max) >= min_p) & (sorted_logits >= kth)
        sorted_kept = sorted_logits.masked_fill(~keep_sorted, float("-inf"))
        log_z = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True)
        sorted_probs = torch.exp(sorted_kept - log_z)  # renormalised over every survivor
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # The last kept position is the first one whose preceding mass is < p; its logit is the cut.
        n_keep = (mass_before < meta.top_p[:, None]).sum(dim=-1).clamp(min=1)
        cut_beyond_prefix = (n_keep == width) & (meta.top_p < 1.0)
        if width == vocab or not bool(cut_beyond_prefix.any()):
            break
        width = vocab
    cut = sorted_kept.gather(-1, (n_keep - 1)[:, None])
    keep &= (logits >= cut) | (meta.top_p[:, None] >= 1.0)
    return logits.masked_fill(~keep, float("-inf"))


def _gumbel_reference(row_key: torch.Tensor, vocab_index: torch.Tensor) -> torch.Tensor:
    """Gumbel noise g = -log(-log(u)), u = rand(row_key, vocab index); row_key = randint(seed, position)."""
    u = philox_uniform(row_key, vocab_index).clamp(min=_MIN_UNIFORM, max=_MAX_UNIFORM)
    return -torch.log(-torch.log(u))


def _gumbel_argmax_reference(x: torch.Tensor, row_key: torch.Tensor) -> torch.Tensor:
    """argmax(x + g) per row of filtered logits x [R, V], drawing noise only where x could win.

    Equal to argmax(x + g) with noise g drawn for every entry: filtered entries are -inf either way,
    g is bounded (_GUMBEL_LOW..._GUMBEL_HIGH) so an entry more than _GUMBEL_SPREAD below its row's
    best never wins, and the noise of an entry depends only on (row_key, vocabulary index). Philox on
    the CPU costs ~150 integer ops per entry: after top-p (tens of survivors), or without it after
    the bound (hundreds of 49k), this is 100-1000x less work.
    """
    best = x.max(dim=-1, keepdim=True).values
    rows, cols = (torch.isfinite(x) & (x >= best - _GUMBEL_SPREAD)).nonzero(as_tuple=True)
    scores = torch.full_like(x, float("-inf"))
    scores[rows, cols] = x[rows, cols] + _gumbel_reference(row_key[rows], cols)
    return torch.argmax(scores, dim=-1)


def sample_reference(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draws one token per row. logits: [B, V] any float dtype. Returns (tokens [B] int64, logprobs [B] | None)."""
    raw = logits.float()
    x = apply_penalties_reference(raw, meta)
    tokens = torch.argmax(x, dim=-1)  # greedy rows; first maximum: ties go to the lowest index
    sampled = (meta.temperature > 0).nonzero(as_tuple=True)[0]
    if len(sampled):
        rows = meta.select(sampled)
        xs = apply_top_k_top_p_min_p_reference(x[sampled] / rows.temperature[:, None], rows)
        row_key = philox_randint(rows.seed.to(x.device), rows.position.to(x.device))
        tokens[sampled] = _gumbel_argmax_reference(xs, row_key)
    logprobs = None
    if meta.want_logprobs:
        logprobs = torch.log_softmax(raw, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
