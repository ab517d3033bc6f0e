"""Checkpoint-neutral parameter names, and their fusion into the decoder's own parameters.

Both loaders first map their file's names to the neutral (gpt-fast) names below, one tensor per
projection; `fuse_projections` then concatenates q/k/v and gate/up so the forward does one matmul
per block instead of three (or two). Shapes are nn.Linear's: [out_features, in_features].

    tok_embeddings.weight               [V, dim]
    layers.{i}.attention_norm.weight    [dim]
    layers.{i}.attention.wq.weight      [n_heads * head_dim, dim]   (+ .bias for Qwen2)
    layers.{i}.attention.wk.weight      [n_kv_heads * head_dim, dim] (+ .bias)
    layers.{i}.attention.wv.weight      [n_kv_heads * head_dim, dim] (+ .bias)
    layers.{i}.attention.wo.weight      [dim, n_heads * head_dim]
    layers.{i}.ffn_norm.weight          [dim]
    layers.{i}.feed_forward.w1.weight   [hidden, dim]  (gate)
    layers.{i}.feed_forward.w3.weight   [hidden, dim]  (up)
    layers.{i}.feed_forward.w2.weight   [dim, hidden]  (down)
    norm.weight                         [dim]
    output.weight                       [V, dim]  (absent when tied)
"""

from __future__ import annotations

import re

import torch

from workers.runtime.config import ModelConfig


class NameMap:
    """A checkpoint format's tensor names -> neutral names: a global table plus a per-layer one."""

    def __init__(self, global_names: dict[str, str], layer_pattern: str, layer_names: dict[str, str]) -> None:
        self.global_names = global_names
        self.layer_pattern = re.compile(layer_pattern)  # groups: (layer index, name within the layer)
        self.layer_names = layer_names

    def neutral(self, name: str) -> str | None:
        """The neutral name of a checkpoint tensor, or None for one the decoder has no use for."""
        if name in self.global_names:
            return self.global_names[name]
        m = self.layer_pattern.fullmatch(name)
        if m and m.group(2) in self.layer_names:
            return f"layers.{m.group(1)}.{self.layer_names[m.group(2)]}"
        return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every neutral name the config needs, with its shape."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (c.dim,)
        shapes[p + "attention.wq.weight"] = (c.q_size, c.dim)
        shapes[p + "attention.wk.weight"] = (c.kv_size, c.dim)
        shapes[p + "attention.wv.weight"] = (c.kv_size, c.dim)
        if c.qkv_bias:
            shapes[p + "attention.wq.bias"] = (c.q_size,)
            shapes[p + "attention.wk.bias"] = (c.kv_size,)
            shapes[p + "attention.wv.bias"] = (c.kv_size,)
        shapes[p + "attention.wo.weight"] = (c.dim, c.q_size)
        shapes[p + "ffn_norm.weight"] = (c.dim,)
        shapes[p + "feed_forward.w1.weight"] = (c.hidden_dim, c.dim)
        shapes[p + "feed_forward.w3.weight"] = (c.hidden_dim, c.dim)
        shapes[p + "feed_forward.w2.weight"] = (c.dim, c.hidden_dim)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> str | None:
    """The first missing or misshapen tensor, described, or None when the set is complete."""
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            return f"tensor {name} is missing"
        if tuple(tensors[name].shape) != shape:
            return f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
    return None


def fuse_projections(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The decoder's state dict: wq|wk|wv -> wqkv [(Hq + 2 Hkv) * D, dim], w1|w3 -> w13 [2 * hidden, dim]."""
    out = {k: v for k, v in tensors.items() if ".attention.w" not in k and ".feed_forward.w" not in k}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        att, ff = p + "attention.", p + "feed_forward."
        out[att + "wqkv.weight"] = torch.cat([tensors[att + f"w{x}.weight"] for x in "qkv"])
        if config.qkv_bias:
            out[att + "wqkv.bias"] = torch.cat([tensors[att + f"w{x}.bias"] for x in "qkv"])
        out[att + "wo.weight"] = tensors[att + "wo.weight"]
        out[ff + "w13.weight"] = torch.cat([tensors[ff + "w1.weight"], tensors[ff + "w3.weight"]])
        out[ff + "w2.weight"] = tensors[ff + "w2.weight"]
    return out


def unfuse_projections(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of fuse_projections: the neutral names, one tensor per projection (for exports)."""
    out = {k: v for k, v in state.items() if ".attention.w" not in k and ".feed_forward.w" not in k}
    sizes = [config.q_size, config.kv_size, config.kv_size]
    for i in range(config.n_layers):
        att, ff = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        for x, part in zip("qkv", state[att + "wqkv.weight"].split(sizes), strict=True):
            out[att + f"w{x}.weight"] = part
        if config.qkv_bias:
            for x, part in zip("qkv", state[att + "wqkv.bias"].split(sizes), strict=True):
                out[att + f"w{x}.bias"] = part
        out[att + "wo.weight"] = state[att + "wo.weight"]
        out[ff + "w1.weight"], out[ff + "w3.weight"] = state[ff + "w13.weight"].chunk(2)
        out[ff + "w2.weight"] = state[ff + "w2.weight"]
    return out
