"""The decoder, both loaders and the dequantizers on tiny random checkpoints (fast; no bundled model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from tests.workers.runtime.forward import packed_logits, rows_batch
from tests.workers.runtime.tiny_checkpoints import (
    random_hf_state,
    raw_k_quant_bytes,
    tiny_hf_config,
    write_gguf,
    write_hf_dir,
)
from workers.runtime.gguf_loader import load_gguf
from workers.runtime.kv_cache import KVCache
from workers.runtime.loader import load_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
VARIANTS = {
    "llama-untied-llama3-rope": dict(arch="llama", tie=False, rope_scaling=LLAMA3_ROPE),
    "llama-tied": dict(arch="llama", tie=True),
    "qwen2-bias-tied": dict(arch="qwen2", tie=True),
}
PROMPTS = [[5, 70, 71, 80, 90, 3, 4, 9, 10, 11, 200, 201, 30, 31, 32, 33, 34, 35, 36, 37], [100, 12, 99], [7]]


@pytest.fixture(params=list(VARIANTS), scope="module")
def tiny(request, tmp_path_factory):
    """(hf config, state, safetensors dir, F32 GGUF path) of one tiny variant."""
    v = VARIANTS[request.param]
    config = tiny_hf_config(v["arch"], tie=v["tie"], rope_scaling=v.get("rope_scaling"))
    state = random_hf_state(config, seed=1)
    root = tmp_path_factory.mktemp(request.param)
    return config, state, write_hf_dir(root / "hf", config, state), write_gguf(root / "m.gguf", config, state)


def test_logits_match_transformers(tiny):
    from transformers import AutoModelForCausalLM

    _, _, hf_dir, _ = tiny
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = packed_logits(load_checkpoint(hf_dir), PROMPTS)
    for prompt, mine in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        diff = (mine - ref).abs()
        assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"


def test_gguf_equals_safetensors(tiny):
    """The GGUF (q/k permuted for llama, names renamed) loads to exactly the safetensors weights."""
    _, _, hf_dir, gguf_path = tiny
    a, b = load_checkpoint(hf_dir), load_checkpoint(gguf_path)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    # Equal weights; llama3 RoPE comes as HF's formula vs GGUF's rope_freqs divisors (float rounding).
    for x, y in zip(packed_logits(a, PROMPTS), packed_logits(b, PROMPTS), strict=True):
        assert (x - y).abs().max() < 1e-5


def test_decode_steps_match_prefill(tiny):
    """Prefilling a prompt then decoding token by token gives the logits of one full prefill."""
    _, _, hf_dir, _ = tiny
    lm = load_checkpoint(hf_dir)
    full = PROMPTS[0]
    reference = packed_logits(lm, [full])[0]
    cpu = torch.device("cpu")
    cache = KVCache(lm.config, num_blocks=8, block_size=4, device=cpu, dtype=torch.float32)
    blocks = [5, 2, 7, 0, 3, 1, 6, 4][: -(-len(full) // 4)]  # any order: the block table says where
    start = 5
    lm.model(rows_batch([(full[:start], 0, blocks)], 4, cpu), cache)
    # The next two tokens as a prefill chunk after the cached prefix, then token by token (decode rows).
    chunk = lm.model(rows_batch([(full[start:start + 2], start, blocks)], 4, cpu), cache)
    assert (chunk - reference[start:start + 2]).abs().max() < 1e-4
    for pos in range(start + 2, len(full)):
        logits = lm.model(rows_batch([([full[pos]], pos, blocks)], 4, cpu, num_decodes=1), cache)
        assert (logits[0] - reference[pos]).abs().max() < 1e-4


# -- dequantization -----------------------------------------------------------------------------------

QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.1, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_dequantize_each_type(qtype, tmp_path):
    config = tiny_hf_config("llama")
    state = random_hf_state(config, seed=2)
    checkpoint = load_gguf(write_gguf(tmp_path / f"{qtype.name}.gguf", config, state, qtype=qtype))
    up = checkpoint.tensors["layers.0.feed_forward.w3.weight"]  # [512, 256]
    original = state["model.layers.0.mlp.up_proj.weight"]
    assert up.shape == original.shape and up.dtype == torch.float32
    if qtype in QUANT_TOLERANCE:  # gguf can quantize these: the round trip stays close to the original
        err = (up - original).abs().max().item()
        assert err <= QUANT_TOLERANCE[qtype] * max(1.0, original.abs().max().item()), err
    else:  # K-quants: the loader's value is gguf's dequantization of the bytes in the file
        index = list(state).index("model.layers.0.mlp.up_proj.weight")
        raw = raw_k_quant_bytes(qtype, *original.shape, seed=index)
        expected = torch.from_numpy(dequantize(raw, qtype).reshape(original.shape).astype(np.float32))
        assert torch.equal(up, expected)
        assert torch.isfinite(up).all() and up.abs().max() > 0


def test_q4_k_block_semantics():
    """One hand-made Q4_K block: d=1, dmin=0, every sub-block scale 1 -> values are the raw nibbles."""
    block = np.zeros(144, dtype=np.uint8)
    block[0:2] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)  # d
    block[2:4] = np.frombuffer(np.float16(0.0).tobytes(), dtype=np.uint8)  # dmin
    block[4:16] = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]  # 6-bit scales = 1, mins = 0 for all 8 sub-blocks
    rng = np.random.default_rng(0)
    lo, hi = rng.integers(0, 16, 128), rng.integers(0, 16, 128)
    block[16:] = (hi << 4) | lo
    values = dequantize(block[None, :], Q.Q4_K).reshape(-1)
    for chunk in range(4):  # each 64 values: 32 low nibbles, then 32 high nibbles of the same 32 bytes
        q = slice(chunk * 32, chunk * 32 + 32)
        np.testing.assert_array_equal(values[chunk * 64: chunk * 64 + 32], lo[q])
        np.testing.assert_array_equal(values[chunk * 64 + 32: chunk * 64 + 64], hi[q])
