"""Kernel timings on a CUDA device: Triton kernels beside the torch references (and FlashInfer / flash-attn).

    .venv/bin/python bench/bench_kernels.py            # CUDA only; one command, well under 5 minutes

Shapes are the targets of kernels.md: sampling B=256, V=49152 fp32 (S6); causal prefill bf16, D=128,
32 query / 8 KV heads, 4 x 4096 tokens (A2), and 8 x 512 new tokens after 3584 cached ones (chunked
prefill, prefix-cache hits); paged decode bf16, 256 sequences x 2048 context (A4), plus a small-batch
long-context decode where split-K matters. Prints one row per case: time, what it achieved (GB/s for
the memory-bound kernels, TFLOP/s for prefill) and that as a share of the H200's 4.8 TB/s or 989
dense bf16 TFLOP/s, and the time of each baseline relative to ours (>1: ours faster).

Bytes counted are the minimum traffic: sampling reads the logits once (plus the penalty counts and
prompt mask when penalties are on), although the kernel makes more passes over a row when filters
are active; decode reads K and V once. Prefill FLOPs are 4 * H * D per (query, key) pair attended,
4 * H * D * (n * c + n^2 / 2) for n new tokens after c cached ones; prefill's K/V are written into
the paged cache before timing (the engine's write_kv precedes prefill attention). `--smoke` runs
tiny shapes on the CPU interpreter to check the script itself (times meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200_BYTES_PER_S = 4.8e12
H200_FLOPS = 989e12


@dataclass
class Row:
    kernel: str
    shape: str
    us: float
    work: float  # bytes or FLOPs per call
    unit: str  # "GB/s" or "TFLOP/s"
    baselines: dict[str, float | str] = field(default_factory=dict)  # name -> us, or why it did not run

    def cells(self) -> list[str]:
        per_s = self.work / (self.us * 1e-6)
        if self.unit == "GB/s":
            achieved, share = f"{per_s / 1e9:8.0f} GB/s", per_s / H200_BYTES_PER_S
        else:
            achieved, share = f"{per_s / 1e12:6.0f} TFLOP/s", per_s / H200_FLOPS
        vs = []
        for name, value in self.baselines.items():
            vs.append(
                f"{name} {value / self.us:.2f}x ({value:.0f} us)" if isinstance(value, float) else f"{name} {value}"
            )
        return [self.kernel, self.shape, f"{self.us:9.1f}", achieved, f"{100 * share:5.1f}%", "; ".join(vs)]


def time_us(fn: Callable[[], object], device: str, rep_ms: int = 100) -> float:
    """Median microseconds per call: CUDA events with L2 flushes via triton.testing.do_bench; wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def try_baseline(fn: Callable[[], float]) -> float | str:
    """A baseline's time, or why it could not run (not installed, API mismatch, out of memory)."""
    try:
        return fn()
    except ImportError:
        return "n/a (not installed)"
    except Exception as exc:  # a baseline's failure must not hide our numbers
        return f"n/a ({type(exc).__name__}: {str(exc)[:60]})"


def bench_sampling(device: str, batch: int, vocab: int) -> list[Row]:
    from kernels.sampling import SamplingMetadata, sample_reference, sample_triton

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, vocab, device=device, generator=gen) * 3

    def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((batch,), value, dtype=dtype, device=device)

    def meta(**kw) -> SamplingMetadata:
        fields = dict(
            temperature=full(0.8),
            top_k=full(0, torch.int32),
            top_p=full(1.0),
            min_p=full(0.0),
            presence_penalty=full(0.0),
            frequency_penalty=full(0.0),
            repetition_penalty=full(1.0),
            seed=torch.arange(batch, device=device, dtype=torch.int64),
            position=torch.full((batch,), 17, device=device, dtype=torch.int32),
        )
        fields.update(kw)
        return SamplingMetadata(**fields)

    counts = torch.randint(0, 3, (batch, vocab), device=device, dtype=torch.int32, generator=gen)
    counts *= torch.rand(batch, vocab, device=device, generator=gen) < 0.01
    prompt = torch.rand(batch, vocab, device=device, generator=gen) < 0.01
    cases = {
        "temperature": (meta(), 0),
        "+top-k 50, top-p 0.9": (meta(top_k=full(50, torch.int32), top_p=full(0.9)), 0),
        "+min-p 0.05, penalties": (
            meta(
                top_k=full(50, torch.int32),
                top_p=full(0.9),
                min_p=full(0.05),
                presence_penalty=full(0.5),
                frequency_penalty=full(0.5),
                repetition_penalty=full(1.1),
                output_counts=counts,
                prompt_mask=prompt,
            ),
            batch * vocab * 5,  # counts int32 + prompt mask bytes
        ),
    }
    rows = []
    for name, (m, extra_bytes) in cases.items():
        us = time_us(lambda m=m: sample_triton(logits, m), device)
        baselines = {"torch ref": try_baseline(lambda m=m: time_us(lambda: sample_reference(logits, m), device))}
        if name.startswith("+top-k") and device == "cuda":

            def flashinfer_topk_topp() -> float:
                import flashinfer.sampling as fs

                top_k, top_p = full(50, torch.int32), full(0.9)
                return time_us(lambda: fs.top_k_top_p_sampling_from_logits(logits / 0.8, top_k, top_p), device)

            baselines["flashinfer"] = try_baseline(flashinfer_topk_topp)
        rows.append(Row(f"sample {name}", f"B={batch} V={vocab} fp32", us, batch * vocab * 4 + extra_bytes, "GB/s",
                        baselines))  # fmt: skip
    return rows


def bench_prefill(
    device: str, lengths: list[int], q_heads: int, kv_heads: int, head_dim: int, dtype, *,
    contexts: list[int] | None = None,
) -> Row:
    """lengths: new tokens per sequence; contexts: tokens already cached before them (prefix hit, earlier chunks)."""
    import torch.nn.functional as F

    from kernels.attention_prefill import prefill_attention_reference, prefill_attention_triton, write_kv_reference

    gen = torch.Generator(device=device).manual_seed(1)
    contexts = contexts or [0] * len(lengths)
    seq_lens = [c + n for c, n in zip(contexts, lengths, strict=True)]
    block_size = 16
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    cu_seqlens_k = torch.tensor([0, *seq_lens], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lengths), q_heads, head_dim, device=device, generator=gen).to(dtype)
    # Every sequence's K/V [sum(seq_lens), Hkv, D] packed, context first: the baselines' contiguous input.
    k, v = (torch.randn(sum(seq_lens), kv_heads, head_dim, device=device, generator=gen).to(dtype) for _ in range(2))
    blocks_per_seq = -(-max(seq_lens) // block_size)
    num_blocks = len(lengths) * blocks_per_seq
    table = torch.randperm(num_blocks, device=device).view(len(lengths), blocks_per_seq).to(torch.int32)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    # Context and new K/V into the cache, outside the timed region (the engine's write_kv precedes the call).
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(seq_lens, device=device))
    slots = table[seq_ids, positions // block_size].to(torch.int64) * block_size + positions % block_size
    write_kv_reference(k, v, k_cache, v_cache, slots)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, cu_seqlens, torch.tensor(seq_lens, device=device, dtype=torch.int32), table, scale)
    us = time_us(lambda: prefill_attention_triton(*args, max_seqlen_q=max(lengths)), device)
    # Causal: new token i after c cached ones attends c + i + 1 keys; 4 * H * D FLOPs per (query, key) pair.
    flops = sum(4 * q_heads * head_dim * (n * c + n * n / 2) for n, c in zip(lengths, contexts, strict=True))

    def torch_sdpa() -> float:
        qb, kb = cu_seqlens.tolist(), cu_seqlens_k.tolist()
        masks = [  # bottom-right causal (SDPA's is_causal is top-left aligned, the same only without context)
            None if c == 0 else torch.ones(n, c + n, device=device, dtype=torch.bool).tril(c)
            for n, c in zip(lengths, contexts, strict=True)
        ]

        def run():
            for s, mask in enumerate(masks):
                qs = q[qb[s] : qb[s + 1]].transpose(0, 1)[None]
                ks, vs = (t[kb[s] : kb[s + 1]].transpose(0, 1)[None] for t in (k, v))
                F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                               enable_gqa=True)  # fmt: skip

        return time_us(run, device)

    def flash_attn() -> float:
        from flash_attn import flash_attn_varlen_func  # causal is bottom-right aligned since flash-attn 2.1

        mq, mk = max(lengths), max(seq_lens)
        return time_us(lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens_k, mq, mk, causal=True), device)

    baselines = {"torch ref": try_baseline(lambda: time_us(lambda: prefill_attention_reference(*args), device))}
    baselines["torch sdpa"] = try_baseline(torch_sdpa)
    if device == "cuda":
        baselines["flash-attn"] = try_baseline(flash_attn)
    ctx = f" ctx {max(contexts)}" if any(contexts) else ""
    shape = f"{len(lengths)}x{max(lengths)}{ctx} Hq={q_heads} Hkv={kv_heads} D={head_dim} {str(dtype)[6:]} causal"
    return Row("prefill (paged K/V)", shape, us, flops, "TFLOP/s", baselines)


def bench_decode(device: str, batch: int, ctx: int, q_heads: int, kv_heads: int, head_dim: int, dtype) -> Row:
    from kernels.attention_decode import choose_num_splits, decode_attention_reference, decode_attention_triton

    gen = torch.Generator(device=device).manual_seed(2)
    block_size = 16
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq
    table = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(batch, q_heads, head_dim, device=device, generator=gen).to(dtype)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, table, seq_lens, scale)
    us = time_us(lambda: decode_attention_triton(*args, max_seq_len=ctx), device)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * k_cache.element_size()

    def flashinfer_decode() -> float:
        import flashinfer

        workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        indptr = torch.arange(batch + 1, device=device, dtype=torch.int32) * blocks_per_seq
        last_page_len = torch.full((batch,), (ctx - 1) % block_size + 1, device=device, dtype=torch.int32)
        wrapper.plan(indptr, table.flatten(), last_page_len, q_heads, kv_heads, head_dim, block_size,
                     data_type=dtype, q_data_type=dtype)  # fmt: skip
        return time_us(lambda: wrapper.run(q, (k_cache, v_cache)), device)

    baselines = {}
    if batch * ctx <= 64 * 2048 or device == "cuda":  # the reference gathers the whole context in fp32
        baselines["torch ref"] = try_baseline(lambda: time_us(lambda: decode_attention_reference(*args), device))
    if device == "cuda":
        baselines["flashinfer"] = try_baseline(flashinfer_decode)
    splits = choose_num_splits(batch, kv_heads, ctx)
    shape = f"B={batch} ctx={ctx} Hq={q_heads} Hkv={kv_heads} D={head_dim} {str(dtype)[6:]} page {block_size}"
    return Row(f"decode (splits={splits})", shape, us, kv_bytes, "GB/s", baselines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Time genq's Triton kernels on a CUDA device.")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and so triton) are imported
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (this machine has none); --smoke checks the script on CPU.")
        return 2
    device = "cpu" if args.smoke else "cuda"
    bf16 = torch.float32 if args.smoke else torch.bfloat16
    started = time.perf_counter()
    if args.smoke:
        rows = bench_sampling(device, 8, 1000)
        rows.append(bench_prefill(device, [40, 30], 4, 2, 64, bf16))
        rows.append(bench_prefill(device, [20, 30], 4, 2, 64, bf16, contexts=[50, 0]))
        rows.append(bench_decode(device, 2, 100, 4, 1, 64, bf16))
    else:
        print(f"device: {torch.cuda.get_device_name()}; peaks used: 4.8 TB/s, 989 TFLOP/s (H200 dense bf16)")
        rows = bench_sampling(device, 256, 49152)
        rows.append(bench_prefill(device, [4096] * 4, 32, 8, 128, bf16))
        rows.append(bench_prefill(device, [2048, 1024, 3000, 500, 4096], 32, 8, 128, bf16))
        rows.append(bench_prefill(device, [512] * 8, 32, 8, 128, bf16, contexts=[3584] * 8))  # chunks / prefix hits
        rows.append(bench_decode(device, 256, 2048, 32, 8, 128, bf16))
        rows.append(bench_decode(device, 4, 16384, 32, 8, 128, bf16))
        rows.append(bench_decode(device, 64, 4096, 32, 8, 64, torch.float16))
    header = ["kernel", "shape", "time (us)", "achieved", "% H200", "baselines (their time / ours)"]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
