"""ModelConfig: the shape of a Llama-family decoder, read from GGUF metadata or a config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Architectures the decoder implements; Qwen2 is Llama with q/k/v biases.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched beyond the training context (HF's rope_scaling)."""

    kind: str = "none"  # "none", "linear" or "llama3"
    factor: float = 1.0  # linear: positions / factor; llama3: low frequencies / factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_context / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_context / high_freq_factor are kept
    original_context: int = 8192  # llama3: the pre-extension context length


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder; loaders fill it once from the checkpoint."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int  # rows of the embedding and of the output head
    dim: int  # residual stream width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA: n_heads % n_kv_heads == 0)
    head_dim: int  # usually dim // n_heads
    hidden_dim: int  # SwiGLU inner width
    norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # RoPE base
    context_length: int  # longest sequence the checkpoint was trained for
    tie_embeddings: bool  # output head shares the embedding matrix
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling = RopeScaling()
    # GGUF's rope_freqs tensor (llama3 scaling precomputed by llama.cpp): inv_freq[i] /= factors[i].
    rope_freq_factors: tuple[float, ...] | None = None

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32: theta^(-2i/d), then the checkpoint's scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if config.rope_freq_factors is not None:
        return inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        # HF's _compute_llama3_parameters: keep high frequencies, divide low ones by factor, blend between.
        low_wavelen = scaling.original_context / scaling.low_freq_factor
        high_wavelen = scaling.original_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


def config_from_gguf_metadata(meta: dict[str, Any], has_output_tensor: bool, n_tokens: int) -> ModelConfig:
    """ModelConfig from GGUF key/values (llama.cpp names, prefixed by the architecture)."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise KeyError(f"{arch}.{name}")
        return value

    dim = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    rope_scaling = RopeScaling()
    if scaling_type == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(key("rope.scaling.factor")))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size", n_tokens)),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=int(key("attention.key_length", dim // n_heads)),
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        context_length=int(key("context_length", 4096)),
        tie_embeddings=not has_output_tensor,
        qkv_bias=arch == "qwen2",
        rope_scaling=rope_scaling,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
    arch = hf.get("model_type", "")
    dim = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "llama3":
        rope_scaling = RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_context=int(rope["original_max_position_embeddings"]),
        )
    elif kind == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(rope["factor"]))
    elif kind == "default":
        rope_scaling = RopeScaling()
    else:
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or dim // n_heads),
        hidden_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        context_length=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_scaling=rope_scaling,
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json for `config` in transformers' LlamaConfig/Qwen2Config spelling (for exports and tests)."""
    hf: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if config.architecture == "qwen2" else "LlamaForCausalLM"],
        "model_type": "qwen2" if config.architecture == "qwen2" else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias,
        "hidden_act": "silu",
    }
    s = config.rope_scaling
    if s.kind == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_context}
    elif s.kind == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    return hf
