"""Prefill and decode attention: Triton kernels (interpreter on CPU) against the torch references, targets A1 and A3."""

import pytest
import torch

import kernels
from kernels.attention_decode import (
    CUDA_DECODE_CONFIG,
    decode_attention_reference,
    decode_attention_triton,
)
from kernels.attention_prefill import (
    CUDA_PREFILL_CONFIGS,
    prefill_attention_reference,
    prefill_attention_triton,
    write_kv_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = [torch.float32, torch.float16]  # bf16 has no arithmetic in the interpreter; see the bf16 tests


def paged_cache(gen, batch, max_len, block_size, kv_heads, head_dim, dtype, *, num_blocks=None, fill=False):
    """Caches [num_blocks, block_size, Hkv, D] and a random block table [B, max_blocks] (no block shared)."""
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = num_blocks or batch * blocks_per_seq + 3
    table = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    make = torch.randn if fill else torch.zeros
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = (make(shape, generator=gen) if fill else make(shape)).to(dtype)
    v_cache = (make(shape, generator=gen) if fill else make(shape)).to(dtype)
    return k_cache, v_cache, table.to(torch.int32)


def lowp_attention(q, k, v, causal):
    """Attention computed entirely in q's dtype: the error a plain torch kernel would make (FA's baseline)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def assert_attention_close(out, ref, lowp_err):
    """A1/A3: err <= 2 * err_torch_lowp + fwd_atol against the fp32 reference, and atol 1.5e-2 / rtol 1e-2."""
    err = (out.float() - ref.float()).abs()
    ref_lowp = ref.to(out.dtype)
    fwd_atol = 2 * ((ref_lowp + 0.3 - 0.3) - ref_lowp).abs().max().item()
    detail = f"max err {err.max().item():.3g}, mean {err.mean().item():.3g}, torch low-precision max {lowp_err:.3g}"
    assert err.max().item() <= 2 * lowp_err + fwd_atol + 1e-5, detail
    torch.testing.assert_close(out.float(), ref.float(), atol=1.5e-2, rtol=1e-2, msg=lambda m: f"{m}\n{detail}")


# --- prefill (A1) ------------------------------------------------------------------------------


def cache_slots(table, block_size, contexts, new_lens):
    """Flat cache slots [T] of the new tokens: sequence s's sit at positions contexts[s] + 0 .. new_lens[s] - 1."""
    slots = []
    for s, (ctx, new) in enumerate(zip(contexts, new_lens, strict=True)):
        positions = torch.arange(ctx, ctx + new)
        slots.append(table[s, positions // block_size].long() * block_size + positions % block_size)
    return torch.cat(slots)


def gather_sequence(cache, table, s, length):
    """Sequence s's first `length` cached rows [length, Hkv, D], read through the block table."""
    positions = torch.arange(length)
    return cache[table[s, positions // cache.shape[1]].long(), positions % cache.shape[1]]


def make_prefill(new_lens, contexts, q_heads, kv_heads, head_dim, block_size, dtype, *, seed=0, num_blocks=None):
    """Packed q [T, Hq, D] for the new tokens and a filled paged cache (random prefix, then the new K/V written
    by write_kv_reference); returns (q, k_cache, v_cache, cu_seqlens, seq_lens, table)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(contexts, new_lens, strict=True)]
    k_cache, v_cache, table = paged_cache(
        gen, len(new_lens), max(seq_lens), block_size, kv_heads, head_dim, dtype, num_blocks=num_blocks, fill=True
    )
    q = torch.randn(sum(new_lens), q_heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(sum(new_lens), kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    write_kv_reference(k, v, k_cache, v_cache, cache_slots(table, block_size, contexts, new_lens))
    cu_seqlens = torch.tensor([0, *new_lens]).cumsum(0).to(torch.int32)
    return q, k_cache, v_cache, cu_seqlens, torch.tensor(seq_lens, dtype=torch.int32), table


def run_prefill(new_lens, q_heads, kv_heads, head_dim, block_size, dtype, *, contexts=None, config=None, seed=0):
    """Triton against the reference (A1 tolerances); contexts: cached tokens before each sequence's new ones."""
    contexts = contexts or [0] * len(new_lens)
    args = make_prefill(new_lens, contexts, q_heads, kv_heads, head_dim, block_size, dtype, seed=seed)
    q, k_cache, v_cache, cu_seqlens, seq_lens, table = args
    before = k_cache.clone(), v_cache.clone()
    scale = head_dim**-0.5
    out = prefill_attention_triton(*args, scale, config=config)
    ref = prefill_attention_reference(*args, scale)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the kernel must not write the cache"
    bounds = cu_seqlens.tolist()
    lowp_err = 0.0
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if end == start:
            continue
        ks, vs = (gather_sequence(c, table, s, int(seq_lens[s])) for c in (k_cache, v_cache))
        lowp = lowp_attention(q[start:end], ks, vs, causal=True)  # causal mask bottom-right aligned
        lowp_err = max(lowp_err, (lowp.float() - ref[start:end].float()).abs().max().item())
    assert_attention_close(out, ref, lowp_err)
    return out, ref, args


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (3, 1), (8, 2), (8, 1)], ids=lambda x: str(x))
def test_prefill_matches_reference(q_heads, kv_heads, head_dim, dtype):
    """No cached prefix: ragged lengths (1, shorter and longer than a tile, not multiples of the page) in one
    launch; GQA 1/3/4/8."""
    run_prefill([37, 1, 70, 16], q_heads, kv_heads, head_dim, block_size=16, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (3, 1), (8, 2)], ids=lambda x: str(x))
def test_prefill_with_cached_prefix_matches_reference(q_heads, kv_heads, head_dim, dtype):
    """Sequences with and without context in one launch: contexts not multiples of the page nor of the key tile
    (13, 50), one a whole page (16), one a whole query tile (32); GQA 1/3/4."""
    run_prefill(
        [37, 1, 40, 16, 5], q_heads, kv_heads, head_dim, block_size=16, dtype=dtype, contexts=[13, 50, 0, 16, 32]
    )


def test_prefill_context_with_odd_page_size():
    """A page of 7: neither context nor tile boundaries meet page boundaries."""
    run_prefill([45, 20], 4, 2, 64, block_size=7, dtype=torch.float32, contexts=[23, 0], seed=1)


def test_prefill_odd_page_size_and_single_sequence():
    run_prefill([45], 4, 2, 64, block_size=7, dtype=torch.float32, seed=1)


def test_prefill_skips_sequences_without_new_tokens():
    """A sequence with cached tokens but none new (and one with neither) owns no rows of q and is skipped."""
    out, ref, args = run_prefill([0, 20, 0, 9], 4, 1, 64, block_size=16, dtype=torch.float32, contexts=[30, 5, 0, 0])
    assert out.shape == (29, 4, 64) and torch.isfinite(out).all()


def test_prefill_of_one_token_equals_decode():
    """One new token after a long context is a decode step: prefill and decode attention agree."""
    new, contexts = [1, 1, 1, 1], [200, 63, 0, 16]
    out, ref, (q, k_cache, v_cache, cu_seqlens, seq_lens, table) = run_prefill(
        new, 8, 2, 64, block_size=16, dtype=torch.float32, contexts=contexts, seed=2
    )
    decode = decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 64**-0.5)
    torch.testing.assert_close(ref, decode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, decode, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_cuda_tile_shape_in_interpreter(head_dim):
    """The launcher's CUDA tile shape (BLOCK_M 128, BLOCK_N 64) over sequences longer than a tile, one after a
    context that is not a multiple of BLOCK_N (unmasked tiles, then diagonal tiles straddling the context end)."""
    config = CUDA_PREFILL_CONFIGS[head_dim]
    run_prefill([150, 9, 130], 4, 1, head_dim, 16, torch.float16, contexts=[0, 70, 100], config=config)


def test_prefill_bf16_is_upcast_in_interpreter():
    run_prefill([20, 33], 4, 2, 64, block_size=16, dtype=torch.bfloat16, contexts=[0, 19])


def full_causal_attention(q, k, v, scale):
    """Causal attention over one whole sequence q [L, Hq, D], k/v [L, Hkv, D], in fp64 without SDPA."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, dim=1), v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1), v)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (6, 2), (8, 2)], ids=lambda x: str(x))
def test_prefill_reference_with_context_equals_full_causal_attention(q_heads, kv_heads):
    """The oracle's oracle: the reference for new tokens after a cached prefix gives the last rows of causal
    attention over the whole sequence computed in one go; so does a chunked prefill, chunk by chunk."""
    gen = torch.Generator().manual_seed(3)
    lengths, contexts, block_size, head_dim, scale = [50, 23, 64, 9], [17, 0, 48, 8], 16, 64, 0.1
    k_cache, v_cache, table = paged_cache(gen, len(lengths), max(lengths), block_size, kv_heads, head_dim,
                                          torch.float32)  # fmt: skip
    qs = [torch.randn(n, q_heads, head_dim, generator=gen) for n in lengths]
    ks, vs = ([torch.randn(n, kv_heads, head_dim, generator=gen) for n in lengths] for _ in range(2))
    write_kv_reference(torch.cat(ks), torch.cat(vs), k_cache, v_cache,
                       cache_slots(table, block_size, [0] * len(lengths), lengths))  # fmt: skip
    full = [full_causal_attention(q, k, v, scale) for q, k, v in zip(qs, ks, vs, strict=True)]
    seq_lens = torch.tensor(lengths, dtype=torch.int32)

    new = [n - c for n, c in zip(lengths, contexts, strict=True)]
    cu_seqlens = torch.tensor([0, *new]).cumsum(0).to(torch.int32)
    q_new = torch.cat([q[c:] for q, c in zip(qs, contexts, strict=True)])
    out = prefill_attention_reference(q_new, k_cache, v_cache, cu_seqlens, seq_lens, table, scale)
    expected = torch.cat([f[c:] for f, c in zip(full, contexts, strict=True)])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)

    # Chunks of 20 tokens per step; a sequence that has finished has no new tokens in later steps.
    for done in range(0, max(lengths), 20):
        chunk = [min(20, max(n - done, 0)) for n in lengths]
        cu_seqlens = torch.tensor([0, *chunk]).cumsum(0).to(torch.int32)
        ends = torch.tensor([min(done + 20, n) for n in lengths], dtype=torch.int32)
        q_chunk = torch.cat([q[done : done + c] for q, c in zip(qs, chunk, strict=True)])
        out = prefill_attention_reference(q_chunk, k_cache, v_cache, cu_seqlens, ends, table, scale)
        expected = torch.cat([f[done : done + c] for f, c in zip(full, chunk, strict=True)])
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_prefill_launcher_checks_shapes():
    q, k_cache, v_cache, cu_seqlens, seq_lens, table = make_prefill([5, 3], [2, 0], 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, seq_lens[:1], table, 0.125)
    with pytest.raises(ValueError, match="block_tables"):
        prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, seq_lens, table[:1], 0.125)
    with pytest.raises(ValueError, match="heads"):
        prefill_attention_triton(q[:, :3], k_cache, v_cache, cu_seqlens, seq_lens, table, 0.125)
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        prefill_attention_triton(q, k_cache, v_cache[:, :8], cu_seqlens, seq_lens, table, 0.125)


# --- decode (A3) -------------------------------------------------------------------------------


def run_decode(lengths, q_heads, kv_heads, head_dim, block_size, dtype, *, num_splits, config=None, num_blocks=None):
    gen = torch.Generator().manual_seed(sum(lengths) + q_heads)
    batch = len(lengths)
    k_cache, v_cache, table = paged_cache(
        gen, batch, max(lengths), block_size, kv_heads, head_dim, dtype, num_blocks=num_blocks, fill=True
    )
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    out = decode_attention_triton(q, k_cache, v_cache, table, seq_lens, scale, num_splits=num_splits, config=config)
    ref = decode_attention_reference(q, k_cache, v_cache, table, seq_lens, scale)
    lowp_err = 0.0
    for b, length in enumerate(lengths):
        positions = torch.arange(length)
        blocks, offsets = table[b, positions // block_size].long(), positions % block_size
        lowp = lowp_attention(q[b : b + 1], k_cache[blocks, offsets], v_cache[blocks, offsets], causal=False)
        lowp_err = max(lowp_err, (lowp.float() - ref[b : b + 1].float()).abs().max().item())
    assert_attention_close(out, ref, lowp_err)
    return out


@pytest.mark.parametrize("num_splits", [1, 3], ids=["split_off", "split_on"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (6, 2), (8, 2), (8, 1)], ids=lambda x: str(x))
def test_decode_matches_reference(q_heads, kv_heads, head_dim, dtype, num_splits):
    """seq_len 1 and lengths not a multiple of the page; GQA 1/3/4/8; split-K on and off."""
    run_decode([1, 50, 77, 16], q_heads, kv_heads, head_dim, block_size=16, dtype=dtype, num_splits=num_splits)


def test_decode_split_on_and_off_agree():
    args = ([300, 5, 129], 8, 2, 64, 16, torch.float32)
    off = run_decode(*args, num_splits=1)
    on = run_decode(*args, num_splits=5)  # some splits are empty for the short sequences
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_decode_many_blocks_and_odd_page_size():
    """num_blocks >= 32768 (A3; the kernel widens block ids to int64 before scaling) and a page of 7."""
    run_decode([40, 3], 4, 1, 64, block_size=7, dtype=torch.float16, num_splits=2, num_blocks=32768)


def test_decode_cuda_tile_shape_in_interpreter():
    run_decode([200, 70], 8, 2, 128, 16, torch.float16, num_splits=None, config=CUDA_DECODE_CONFIG)


def test_decode_group_wider_than_tile():
    """32 query heads per KV head: the launcher widens BLOCK_H."""
    run_decode([20, 9], 32, 1, 64, 16, torch.float32, num_splits=2)


def test_decode_bf16_is_upcast_in_interpreter():
    run_decode([20, 33], 4, 2, 64, 16, torch.bfloat16, num_splits=2)


def test_head_major_cache_view_through_both_kernels():
    """A cache stored [Hkv, num_blocks, block_size, D] and passed as the permuted view: the kernels go by
    strides, so they must agree with the reference on it."""
    gen = torch.Generator().manual_seed(5)
    k_dense, v_dense, table = paged_cache(gen, 3, 70, 16, 2, 64, torch.float32, fill=True)
    k_cache, v_cache = (c.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for c in (k_dense, v_dense))
    assert k_cache.stride(2) > k_cache.stride(0) and torch.equal(k_cache, k_dense)
    q = torch.randn(3, 8, 64, generator=gen)
    seq_lens = torch.tensor([70, 33, 1], dtype=torch.int32)
    ref = decode_attention_reference(q, k_dense, v_dense, table, seq_lens, 0.125)
    torch.testing.assert_close(decode_attention_triton(q, k_cache, v_cache, table, seq_lens, 0.125), ref,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.125), ref)
    qp = torch.randn(12, 8, 64, generator=gen)
    cu = torch.tensor([0, 5, 12, 12], dtype=torch.int32)  # 5 new after 65 cached, 7 after 26, none
    ref = prefill_attention_reference(qp, k_dense, v_dense, cu, seq_lens, table, 0.125)
    torch.testing.assert_close(prefill_attention_triton(qp, k_cache, v_cache, cu, seq_lens, table, 0.125), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_blocks", [1, 3])
@pytest.mark.parametrize("q_heads,kv_heads", [(3, 3), (9, 3), (8, 1)], ids=lambda x: str(x))
def test_decode_reference_cascade_over_a_shared_prefix(q_heads, kv_heads, shared_blocks):
    """Rows whose first blocks are one shared prefix: scoring it once for all rows equals plain attention."""
    gen = torch.Generator().manual_seed(q_heads + shared_blocks)
    k_cache, v_cache, table = paged_cache(gen, 4, 90, 16, kv_heads, 64, torch.float32, fill=True)
    table[:, :shared_blocks] = table[0, :shared_blocks]
    q = torch.randn(4, q_heads, 64, generator=gen)
    seq_lens = torch.tensor([90, 16 * shared_blocks + 1, 57, 16 * shared_blocks + 16], dtype=torch.int32)
    plain = decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.125)
    cascade = decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.125, shared_blocks=shared_blocks)
    torch.testing.assert_close(cascade, plain, atol=1e-5, rtol=1e-5)
    for b, length in enumerate(seq_lens.tolist()):  # and both equal attention over the gathered sequence
        positions = torch.arange(length)
        blocks, offsets = table[b, positions // 16].long(), positions % 16
        k, v = k_cache[blocks, offsets], v_cache[blocks, offsets]  # [L, Hkv, D]
        group = q_heads // kv_heads
        scores = torch.einsum("hd,lhd->hl", q[b], k.repeat_interleave(group, 1)) * 0.125
        expected = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v.repeat_interleave(group, 1))
        torch.testing.assert_close(cascade[b], expected, atol=1e-5, rtol=1e-5)


def test_caches_strided_in_head_dim_are_refused():
    """Both kernels index the cache's D axis with unit steps; a cache that is not laid out so is an error."""
    k_cache = torch.zeros(4, 16, 64, 2).transpose(2, 3)  # [num_blocks, block_size, Hkv, D], D stride 2
    v_cache = torch.zeros(4, 16, 64, 2).transpose(2, 3)
    table = torch.zeros(1, 4, dtype=torch.int32)
    q = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="unit in D"):
        decode_attention_triton(q, k_cache, v_cache, table, torch.tensor([5], dtype=torch.int32), 0.125)
    cu_seqlens, seq_lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="unit in D"):
        prefill_attention_triton(q, k_cache, v_cache, cu_seqlens, seq_lens, table, 0.125)


# --- dispatch ----------------------------------------------------------------------------------


def test_dispatch_runs_triton_on_cpu_only_when_asked(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, table = paged_cache(gen, 2, 20, 16, 2, 64, torch.float32, fill=True)
    q = torch.randn(2, 4, 64, generator=gen)
    seq_lens = torch.tensor([20, 7], dtype=torch.int32)
    calls = []
    monkeypatch.setattr("kernels.dispatch.decode_attention_triton", lambda *a, **kw: calls.append(1) or "triton")
    assert kernels.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125) != "triton"
    monkeypatch.setenv("GENQ_KERNELS", "interpret")
    assert kernels.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, max_seq_len=20) == "triton"
    monkeypatch.setenv("GENQ_KERNELS", "reference")
    assert kernels.decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125) != "triton"
    assert calls == [1]


def test_dispatch_keeps_cuda_fp32_attention_on_the_reference(monkeypatch):
    """On CUDA only the built dtypes run Triton: fp32 prefill tiles at D=128 outgrow sm_90's shared memory."""
    from types import SimpleNamespace

    from kernels.dispatch import use_triton_attention

    def cuda_q(dtype, head_dim=128):
        return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(3, 8, head_dim))

    assert use_triton_attention(cuda_q(torch.bfloat16)) and use_triton_attention(cuda_q(torch.float16))
    assert not use_triton_attention(cuda_q(torch.float32))
    assert not use_triton_attention(cuda_q(torch.bfloat16, head_dim=96))
    monkeypatch.setenv("GENQ_KERNELS", "interpret")
    assert use_triton_attention(torch.zeros(3, 8, 128))  # the CPU interpreter runs fp32


def test_dispatch_interpret_matches_reference(monkeypatch):
    monkeypatch.setenv("GENQ_KERNELS", "interpret")
    args = make_prefill([9, 30], [12, 0], 4, 2, 64, 16, torch.float32, seed=12)
    q, k_cache, v_cache, cu_seqlens, seq_lens, table = args
    out = kernels.prefill_attention(*args, 0.125, max_seqlen_q=30)
    ref = prefill_attention_reference(*args, 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    last = q[cu_seqlens[1:] - 1]  # each sequence's last token, which sees its whole context
    out = kernels.decode_attention(last, k_cache, v_cache, table, seq_lens, 0.125)
    ref = decode_attention_reference(last, k_cache, v_cache, table, seq_lens, 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_prefill_and_decode_match_reference(dtype):
    """Sequences with and without a cached prefix; each sequence's last prefill row is also its decode step."""
    new_lens, contexts = [300, 1, 1000, 77, 0], [0, 500, 37, 2000, 40]
    args = make_prefill(new_lens, contexts, 32, 8, 128, 16, dtype, seed=13, num_blocks=40000)
    q, k_cache, v_cache, cu_seqlens, seq_lens, table = args
    cuda = [t.cuda() for t in args]
    out = prefill_attention_triton(*cuda, 128**-0.5)
    ref = prefill_attention_reference(*args, 128**-0.5)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=1.5e-2, rtol=1e-2)
    assert torch.equal(cuda[1].cpu(), k_cache) and torch.equal(cuda[2].cpu(), v_cache), "prefill wrote the cache"
    has_new = cu_seqlens[1:] > cu_seqlens[:-1]
    last, seq_lens, table = q[cu_seqlens[1:][has_new] - 1], seq_lens[has_new], table[has_new]
    ref = decode_attention_reference(last, k_cache, v_cache, table, seq_lens, 128**-0.5)
    torch.testing.assert_close(out.cpu()[cu_seqlens[1:][has_new] - 1].float(), ref.float(), atol=1.5e-2, rtol=1e-2)
    for splits in (1, 8):
        out = decode_attention_triton(last.cuda(), cuda[1], cuda[2], table.cuda(), seq_lens.cuda(), 128**-0.5,
                                      num_splits=splits)  # fmt: skip
        torch.testing.assert_close(out.cpu().float(), ref.float(), atol=1.5e-2, rtol=1e-2)
