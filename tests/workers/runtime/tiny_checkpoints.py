"""Tiny random Llama/Qwen2 checkpoints written as HF safetensors directories and as GGUF files.

Dimensions are multiples of 256 so every GGUF quantization (K-quants included) can hold them. The
tokenizer is byte-level BPE over the 256 byte symbols plus a few control tokens, no merges.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from workers.runtime.tokenizer import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258
EOS_ID = 258
BOS_ID = 257
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokens() -> list[str]:
    return list(bytes_to_unicode().values()) + SPECIALS


def tiny_hf_config(arch: str = "llama", *, tie: bool = False, rope_scaling: dict | None = None,
                   context: int = 64) -> dict[str, Any]:
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
        "vocab_size": len(tiny_tokens()), "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": context, "tie_word_embeddings": tie,
        "attention_bias": arch == "qwen2", "hidden_act": "silu", "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def random_hf_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in transformers' names; norms near 1, projections ~ N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    d, h, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": rnd(v, d, scale=1.0), "model.norm.weight": 1 + rnd(d, scale=0.1)}
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = rnd(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + rnd(d, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + rnd(d, scale=0.1),
            p + "self_attn.q_proj.weight": rnd(q, d), p + "self_attn.k_proj.weight": rnd(kv, d),
            p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, q),
            p + "mlp.gate_proj.weight": rnd(h, d), p + "mlp.up_proj.weight": rnd(h, d),
            p + "mlp.down_proj.weight": rnd(d, h),
        }
        if config["attention_bias"]:
            state |= {p + "self_attn.q_proj.bias": rnd(q), p + "self_attn.k_proj.bias": rnd(kv),
                      p + "self_attn.v_proj.bias": rnd(kv)}
    return state


def tiny_backend_tokenizer() -> BackendTokenizer:
    tokens = tiny_tokens()
    backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return backend


def write_hf_dir(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                 backend: BackendTokenizer | None = None, chat_template: str = CHATML,
                 eos_token: str = "<|im_end|>", bos_token: str = "<|im_start|>") -> Path:
    """A transformers checkpoint directory: config.json, model.safetensors, tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (backend or tiny_backend_tokenizer()).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": chat_template, "eos_token": eos_token, "bos_token": bos_token, "add_bos_token": False,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's permute: HF rotate-half rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}"


def raw_k_quant_bytes(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks [rows, cols / 256 * block_bytes] with sane f16 scales (gguf cannot quantize these)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin lead the block
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    elif qtype == Q.Q6_K:  # d ends the block
        blocks[:, -2:] = scale
    return blocks.reshape(rows, cols // block_size * type_size)


def encode_tensor(w: np.ndarray, qtype: Q, seed: int) -> np.ndarray:
    """w (float32 [out, in]) in qtype's storage: quantized with gguf, or random K-quant blocks."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return raw_k_quant_bytes(qtype, *w.shape, seed=seed)
    return quantize(w.astype(np.float32), qtype)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs tensor [head_dim / 2]: llama3 scaling as per-frequency divisors."""
    rope, dim = config["rope_scaling"], config["head_dim"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * config["rope_theta"] ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], *, qtype: Q = Q.F32,
               arch: str | None = None, chat_template: str = CHATML, truncate_tokens: bool = False) -> Path:
    """The checkpoint as llama.cpp's converter writes it: GGUF names, permuted q/k (llama), matrices in qtype."""
    arch = arch or config["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tiny_tokens()
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_chat_template(chat_template)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for i, (name, tensor) in enumerate(state.items()):
        value = tensor.numpy().astype(np.float32)
        if arch == "llama" and "q_proj" in name:
            value = llama_cpp_permute(value, n_heads)
        elif arch == "llama" and "k_proj" in name:
            value = llama_cpp_permute(value, n_kv)
        if value.ndim == 2:
            data = encode_tensor(value, qtype, seed=i)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        else:
            w.add_tensor(gguf_name(name), value)
    rope = config.get("rope_scaling")
    if rope and rope["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
