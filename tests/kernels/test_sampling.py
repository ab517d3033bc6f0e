"""Fused sampler: Triton kernel (interpreter on CPU) against the torch reference, targets S1-S5 of kernels.md."""

import subprocess
import sys

import pytest
import torch

from kernels.sampling import (
    CUDA_SAMPLING_CONFIG,
    SamplingConfig,
    SamplingMetadata,
    _gumbel_argmax_reference,
    _gumbel_reference,
    apply_penalties_reference,
    apply_top_k_top_p_min_p_reference,
    filtered_logits_triton,
    sample_reference,
    sample_triton,
)

# Rows beyond the batch and filtered-out entries compute exp(-inf - -inf) in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SHAPES = [(9, 41), (5, 4231)]  # odd shapes; 4231 is not a multiple of any vocabulary tile
ONE_ROW_CONFIG = SamplingConfig(rows=1, block_v=128, nsplit=4, num_warps=1)


def make_meta(batch: int, vocab: int, gen: torch.Generator, **overrides) -> SamplingMetadata:
    """Random sampling parameters with every filter and penalty active on most rows."""
    fields = dict(
        temperature=torch.rand(batch, generator=gen) + 0.3,
        top_k=torch.randint(0, max(2, vocab // 3), (batch,), generator=gen, dtype=torch.int32),
        top_p=torch.rand(batch, generator=gen) * 0.6 + 0.4,
        min_p=torch.rand(batch, generator=gen) * 0.05,
        presence_penalty=torch.rand(batch, generator=gen) - 0.5,
        frequency_penalty=torch.rand(batch, generator=gen) * 0.5,
        repetition_penalty=torch.rand(batch, generator=gen) + 0.8,
        seed=torch.randint(0, 2**32, (batch,), generator=gen),
        position=torch.randint(0, 4096, (batch,), generator=gen, dtype=torch.int32),
        output_counts=torch.randint(0, 3, (batch, vocab), generator=gen, dtype=torch.int32)
        * (torch.rand(batch, vocab, generator=gen) < 0.2),
        prompt_mask=torch.rand(batch, vocab, generator=gen) < 0.1,
        want_logprobs=True,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def plain_meta(batch: int, gen: torch.Generator, **overrides) -> SamplingMetadata:
    """Sampling with every filter and penalty off (temperature 1)."""
    fields = dict(
        temperature=torch.ones(batch),
        top_k=torch.zeros(batch, dtype=torch.int32),
        top_p=torch.ones(batch),
        min_p=torch.zeros(batch),
        presence_penalty=torch.zeros(batch),
        frequency_penalty=torch.zeros(batch),
        repetition_penalty=torch.ones(batch),
        seed=torch.randint(0, 2**32, (batch,), generator=gen),
        position=torch.randint(0, 4096, (batch,), generator=gen, dtype=torch.int32),
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def reference_filtered(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The reference's penalised, temperature-scaled, filtered logits (sampled rows)."""
    x = apply_penalties_reference(logits.float(), meta) / meta.temperature[:, None]
    return apply_top_k_top_p_min_p_reference(x, meta)


# --- S1: greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_greedy_is_argmax_with_ties_to_lowest_index(batch, vocab, dtype):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = torch.randn(batch, vocab, generator=gen).to(dtype)
    # Ties at the maximum, the later one in a different vocabulary tile.
    logits[0, 3] = logits[0, vocab - 2] = 50.0
    logits[1, vocab - 1] = logits[1, vocab - 3] = 50.0
    meta = plain_meta(batch, gen, temperature=torch.zeros(batch))
    tokens, _ = sample_triton(logits, meta)
    expected = torch.argmax(logits.float(), dim=-1)
    assert torch.equal(tokens, expected)
    assert tokens[0] == 3 and tokens[1] == vocab - 3


def test_greedy_rows_mixed_with_sampled_rows_and_penalties():
    gen = torch.Generator().manual_seed(1)
    batch, vocab = 9, 41
    logits = torch.randn(batch, vocab, generator=gen) * 2
    meta = make_meta(batch, vocab, gen)
    meta.temperature[::2] = 0.0
    tokens, _ = sample_triton(logits, meta)
    ref, _ = sample_reference(logits, meta)
    assert torch.equal(tokens, ref)


# --- S2: seeded determinism --------------------------------------------------------------------


def assert_same_draws(logits: torch.Tensor, meta: SamplingMetadata, config: SamplingConfig | None = None) -> None:
    """The kernel draws the reference's tokens, with the same logprobs."""
    tokens, logprobs = sample_triton(logits, meta, config=config)
    ref_tokens, ref_logprobs = sample_reference(logits, meta)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_tokens_equal_reference(batch, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    assert_same_draws(logits, make_meta(batch, vocab, gen))


def test_cuda_config_matches_reference_in_interpreter():
    """The exact tile shape the CUDA launcher uses (one row per program, 1024-wide tiles, 8-ary search)."""
    gen = torch.Generator().manual_seed(7)
    batch, vocab = 4, 2100
    logits = torch.randn(batch, vocab, generator=gen) * 3
    assert_same_draws(logits, make_meta(batch, vocab, gen), config=CUDA_SAMPLING_CONFIG)


def test_same_seed_and_position_draw_the_same_token_in_any_slot_batch_or_block_size():
    gen = torch.Generator().manual_seed(2)
    batch, vocab = 12, 300
    logits = torch.randn(batch, vocab, generator=gen) * 2
    meta = make_meta(batch, vocab, gen)
    meta.temperature[:] = 1.5  # flat enough that the noise decides
    alone, _ = sample_triton(logits, meta)
    # The same requests shuffled into a larger batch among other rows, under other tile shapes.
    others = 20
    big_logits = torch.cat([torch.randn(others, vocab, generator=gen), logits])
    big_meta = make_meta(others + batch, vocab, gen)
    for name, value in vars(meta).items():
        if isinstance(value, torch.Tensor):
            getattr(big_meta, name)[others:] = value
    perm = torch.randperm(others + batch, generator=gen)
    shuffled_logits, shuffled_meta = big_logits[perm], big_meta.select(perm)
    where = torch.argsort(perm)[others:]  # row of each original request in the shuffled batch
    for config in (None, ONE_ROW_CONFIG, SamplingConfig(rows=8, block_v=128, nsplit=8, num_warps=1)):
        tokens, _ = sample_triton(shuffled_logits, shuffled_meta, config=config)
        assert torch.equal(tokens[where], alone), config
    assert torch.equal(sample_triton(logits, meta)[0], alone)  # and again: no hidden state
    # A different position draws differently somewhere (the noise is keyed on it).
    moved = meta.select(torch.arange(batch))
    moved.position = meta.position + 1
    assert not torch.equal(sample_triton(logits, moved)[0], alone)


def test_single_request_batch_matches_reference_row_by_row():
    gen = torch.Generator().manual_seed(3)
    batch, vocab = 6, 97
    logits = torch.randn(batch, vocab, generator=gen)
    meta = make_meta(batch, vocab, gen)
    together, _ = sample_triton(logits, meta)
    for row in range(batch):
        one, _ = sample_triton(logits[row : row + 1], meta.select(torch.tensor([row])))
        assert one.item() == together[row].item()


# --- S3: distribution --------------------------------------------------------------------------


def test_empirical_distribution_matches_filtered_probabilities():
    """200,000 seeded draws of one distribution (every filter binding): cosine > 0.99, no filtered token drawn."""
    draws, vocab = 200_000, 64
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(vocab, generator=gen) * 2
    row[10:14] = row.max() - 0.5  # ties inside the kept set
    full = lambda value, dtype=torch.float32: torch.full((draws,), value, dtype=dtype)  # noqa: E731
    meta = SamplingMetadata(
        temperature=full(0.8),
        top_k=full(24, torch.int32),
        top_p=full(0.9),
        min_p=full(0.01),
        presence_penalty=full(0.0),
        frequency_penalty=full(0.0),
        repetition_penalty=full(1.0),
        seed=torch.randint(0, 2**32, (draws,), generator=gen),
        position=torch.randint(0, 2**20, (draws,), generator=gen, dtype=torch.int32),
    )
    tokens, _ = sample_triton(row.expand(draws, vocab), meta)
    kept = reference_filtered(row[None], meta.select(torch.tensor([0])))[0]
    probs = torch.softmax(kept, dim=-1)
    assert 2 < int((probs > 0).sum()) < 24, "every filter should bind"
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    assert freq[probs == 0].sum() == 0, f"filtered tokens drawn: {torch.nonzero(freq * (probs == 0)).flatten()}"
    cosine = torch.nn.functional.cosine_similarity(freq, probs.double(), dim=0).item()
    assert cosine > 0.99, f"cosine {cosine}, max abs diff {(freq - probs).abs().max().item()}"


# --- S4: kept sets -----------------------------------------------------------------------------

FILTERS = {
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "all": dict(top_k=11, top_p=0.7, min_p=0.02),
    "top_k_ge_vocab": dict(top_k=100_000),
    "top_p_zero": dict(top_p=0.0),
}


def assert_same_filtered(got: torch.Tensor, expected: torch.Tensor) -> None:
    kept_got, kept_exp = got > float("-inf"), expected > float("-inf")
    bad = torch.nonzero(kept_got != kept_exp)
    assert bad.numel() == 0, f"kept sets differ at {bad.tolist()[:10]} (kept {kept_got.sum(1)} vs {kept_exp.sum(1)})"
    torch.testing.assert_close(got[kept_got], expected[kept_exp], atol=1e-6, rtol=0)


@pytest.mark.parametrize("filters", FILTERS, ids=str)
@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_kept_set_equals_sort_based_reference_with_ties(batch, vocab, filters):
    gen = torch.Generator().manual_seed(batch + vocab)
    # Values on a coarse grid: many exact ties, including at every threshold.
    logits = torch.round(torch.randn(batch, vocab, generator=gen) * 4) / 4
    overrides = {
        name: torch.full((batch,), value, dtype=torch.int32 if name == "top_k" else torch.float32)
        for name, value in FILTERS[filters].items()
    }
    meta = plain_meta(batch, gen, **overrides)
    got = filtered_logits_triton(logits, meta)
    assert_same_filtered(got, reference_filtered(logits, meta))


def test_kept_set_with_per_row_parameters_and_cuda_config():
    gen = torch.Generator().manual_seed(5)
    batch, vocab = 6, 3000
    logits = torch.round(torch.randn(batch, vocab, generator=gen) * 8) / 8
    meta = make_meta(batch, vocab, gen)
    meta.top_k[0], meta.top_p[1], meta.min_p[2] = 0, 1.0, 0.0
    for config in (None, CUDA_SAMPLING_CONFIG):
        assert_same_filtered(filtered_logits_triton(logits, meta, config=config), reference_filtered(logits, meta))


def test_minus_inf_logits_padding_vocab_are_handled_like_the_reference():
    """-inf logits (padded or banned tokens), including a row with fewer finite tokens than top-k."""
    gen = torch.Generator().manual_seed(10)
    batch, vocab = 6, 300
    logits = torch.round(torch.randn(batch, vocab, generator=gen) * 4) / 4
    logits[:, 250:] = float("-inf")
    logits[0, 5:] = float("-inf")
    meta = plain_meta(batch, gen, top_k=torch.full((batch,), 20, dtype=torch.int32))
    meta.top_p, meta.min_p = torch.full((batch,), 0.999), torch.full((batch,), 0.001)
    assert_same_filtered(filtered_logits_triton(logits, meta), reference_filtered(logits, meta))
    tokens, _ = sample_triton(logits, meta)
    assert torch.equal(tokens, sample_reference(logits, meta)[0])
    assert bool((logits.gather(1, tokens[:, None]) > float("-inf")).all())


# --- S5: penalties -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch,vocab", SHAPES)
def test_penalties_match_reference(batch, vocab):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    meta = make_meta(batch, vocab, gen)
    meta.top_k[:], meta.top_p[:], meta.min_p[:] = 0, 1.0, 0.0
    got = filtered_logits_triton(logits, meta)
    expected = apply_penalties_reference(logits, meta) / meta.temperature[:, None]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_penalty_reference_follows_vllm_formulas():
    """Repetition divides positive / multiplies negative logits of seen tokens; then frequency, presence."""
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    meta = plain_meta(
        1,
        torch.Generator().manual_seed(0),
        repetition_penalty=torch.tensor([2.0]),
        frequency_penalty=torch.tensor([0.5]),
        presence_penalty=torch.tensor([0.25]),
        output_counts=torch.tensor([[1, 2, 0, 0]], dtype=torch.int32),
        prompt_mask=torch.tensor([[False, False, True, False]]),
    )
    expected = torch.tensor([[2 / 2 - 0.5 - 0.25, -2 * 2 - 1.0 - 0.25, 2 / 2, 1.0]])
    torch.testing.assert_close(apply_penalties_reference(logits, meta), expected)
    torch.testing.assert_close(filtered_logits_triton(logits, meta), expected)


def test_top_p_is_renormalised_over_min_p_and_top_k_survivors():
    """Filters apply in turn: top-p's mass is measured on what min-p and top-k kept."""
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    meta = plain_meta(1, torch.Generator().manual_seed(0), top_k=torch.tensor([3], dtype=torch.int32))
    meta.top_p = torch.tensor([0.75])
    # Over the top-3 (0.4, 0.3, 0.2)/0.9 the first two hold 0.78 >= 0.75: keep 2, not 3.
    kept = apply_top_k_top_p_min_p_reference(probs.log(), meta) > float("-inf")
    assert kept.tolist() == [[True, True, False, False]]
    assert (filtered_logits_triton(probs.log(), meta) > float("-inf")).tolist() == kept.tolist()


def test_logprobs_are_raw_log_softmax_of_chosen_token():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 4231, generator=gen).to(torch.float16)
    meta = make_meta(5, 4231, gen)
    tokens, logprobs = sample_triton(logits, meta)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    meta.want_logprobs = False
    assert sample_triton(logits, meta)[1] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tokens_match_cpu_reference(dtype):
    """S2 across devices: the compiled kernel draws the reference's tokens for the same (seed, position)."""
    gen = torch.Generator().manual_seed(9)
    batch, vocab = 64, 49152
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(dtype)
    meta = make_meta(batch, vocab, gen)
    ref, _ = sample_reference(logits, meta)
    cuda_meta = SamplingMetadata(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(meta).items()})
    tokens, _ = sample_triton(logits.cuda(), cuda_meta)
    agree = (tokens.cpu() == ref).float().mean().item()
    assert agree >= 0.98, f"only {agree:.3f} of tokens agree"  # GPU exp/log are not bit-exact with torch's


def test_kernels_import_and_sample_without_triton():
    """triton is optional: with it unimportable, the package imports and samples on the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "from kernels.sampling import SamplingMetadata\n"
        "import kernels.aot\n"
        "z = torch.zeros(2)\n"
        "meta = SamplingMetadata(z, torch.zeros(2, dtype=torch.int32), z + 1, z, z, z, z + 1,\n"
        "                        torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))\n"
        "print(kernels.sample(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), meta)[0].tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 0]"


def test_noise_drawn_only_where_a_token_could_win_gives_the_full_vocabulary_argmax():
    """The reference draws Gumbel noise only within _GUMBEL_SPREAD of each row's best logit: the same
    tokens as noise on every entry, on rows whose top logits lie a few units apart (so that the best
    logit often loses to one within the spread) and whose tail lies far below."""
    torch.manual_seed(0)
    x = torch.randn(64, 5000) * 8
    x[:, ::7] = float("-inf")  # some filtered entries
    row_key = torch.arange(64, dtype=torch.int64) * 7919 + 11
    cols = torch.arange(x.shape[1], dtype=torch.int64)
    full = torch.argmax(x + _gumbel_reference(row_key[:, None], cols[None, :]), dim=-1)
    assert torch.equal(_gumbel_argmax_reference(x, row_key), full)
    narrow = torch.randn(64, 5000) * 2  # every entry within the spread: all drawn
    full = torch.argmax(narrow + _gumbel_reference(row_key[:, None], cols[None, :]), dim=-1)
    assert torch.equal(_gumbel_argmax_reference(narrow, row_key), full)
