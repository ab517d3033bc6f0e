"""GGUF -> Checkpoint: metadata to ModelConfig, tensors dequantized with `gguf` and renamed, tokenizer.

Quirks handled here, once: GGUF stores shapes innermost-first (reversed), Llama's q/k rows are
permuted into llama.cpp's interleaved RoPE layout (undone below), and a tied output head is simply
an absent output.weight.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from workers.runtime.checkpoint import Checkpoint
from workers.runtime.config import SUPPORTED_ARCHITECTURES, config_from_gguf_metadata
from workers.runtime.errors import ModelLoadError
from workers.runtime.tokenizer import SpecialTokens, tokenizer_from_gguf
from workers.runtime.weights import NameMap, check_tensors

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# Architectures whose converter permuted q/k for llama.cpp's interleaved RoPE (Qwen2 uses NeoX, unpermuted).
_PERMUTED_QK = ("llama", "mistral")

_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_q.bias": "attention.wq.bias",
    "attn_k.bias": "attention.wk.bias", "attn_v.bias": "attention.wv.bias",
    "attn_output.weight": "attention.wo.weight", "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "ffn_down.weight": "feed_forward.w2.weight",
}
_NAMES = NameMap(_GLOBAL_NAMES, r"blk\.(\d+)\.(.+)", _BLOCK_NAMES)


def neutral_name(gguf_name: str) -> str | None:
    """weights.py name of a GGUF tensor, or None for a tensor the decoder has no use for."""
    return _NAMES.neutral(gguf_name)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permute: rows [H, D/2, 2] (interleaved pairs) -> [H, 2, D/2] (HF rotate-half halves)."""
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    """A metadata value as Python: str, int, float, bool or list of those."""
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [v.item() for i in field.data for v in field.parts[i]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]][0].item()


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _dequantize_tensor(t: Any) -> torch.Tensor:
    """fp32 tensor in torch order (GGUF's shape reversed): [out_features, in_features] for matrices."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only memmap
        values = values.copy()
    return torch.from_numpy(values.reshape(shape))


def _open(path: Path) -> GGUFReader:
    if not path.exists():
        raise ModelLoadError(path, "file not found")
    if not path.is_file():
        raise ModelLoadError(path, "not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(path, f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # numpy/struct/ValueError from a damaged header: say so, name the file
        raise ModelLoadError(path, f"truncated or corrupt GGUF ({type(e).__name__}: {e})") from e


def load_gguf(path: str | Path) -> Checkpoint:
    """Reads a GGUF checkpoint; ModelLoadError (naming the file) for anything unreadable or unsupported."""
    path = Path(path)
    reader = _open(path)
    size = path.stat().st_size
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ModelLoadError(path, f"corrupt GGUF metadata ({type(e).__name__}: {e})") from e
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelLoadError(path, f"unsupported architecture {arch!r} (supported: {supported})")
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(path, "no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    try:
        config = config_from_gguf_metadata(meta, "output.weight" in names, len(tokens))
    except KeyError as e:
        raise ModelLoadError(path, f"metadata key {e.args[0]} is missing") from e

    tensors: dict[str, torch.Tensor] = {}
    rope_factors = None
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(path, f"tensor {t.name} has unsupported quantization type {t.tensor_type.name} "
                                       f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(path, f"truncated GGUF: tensor {t.name} needs bytes {t.data_offset}.."
                                       f"{t.data_offset + t.n_bytes} but the file has {size}")
        try:
            value = _dequantize_tensor(t)
        except Exception as e:
            raise ModelLoadError(path, f"tensor {t.name} cannot be dequantized ({type(e).__name__}: {e})") from e
        if t.name == "rope_freqs.weight":
            rope_factors = tuple(value.tolist())
            continue
        name = neutral_name(t.name)
        if name is None:
            raise ModelLoadError(path, f"unexpected tensor {t.name} for architecture {arch}")
        tensors[name] = value
    if rope_factors is not None:
        config = dataclasses.replace(config, rope_freq_factors=rope_factors)
    if arch in _PERMUTED_QK:
        for name in list(tensors):
            if name.endswith(("attention.wq.weight", "attention.wq.bias")):
                tensors[name] = unpermute_qk(tensors[name], config.n_heads)
            elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
                tensors[name] = unpermute_qk(tensors[name], config.n_kv_heads)
    problem = check_tensors(tensors, config)
    if problem:
        raise ModelLoadError(path, problem)
    return Checkpoint(path=path, config=config, tensors=tensors, tokenizer=_tokenizer(path, meta),
                      chat_template=meta.get("tokenizer.chat_template"))


def _tokenizer(path: Path, meta: dict[str, Any]):
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(path, f"unsupported tokenizer {kind!r}: only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id"))
                                  if i is not None))
    special = SpecialTokens(
        bos_id=bos, eos_ids=eos_ids, pad_id=token_id("padding_token_id"),
        bos_token=tokens[bos] if bos is not None else None, eos_token=tokens[eos] if eos is not None else None,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    try:
        return tokenizer_from_gguf(
            tokens, meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.merges", []),
            meta.get("tokenizer.ggml.pre"), bool(meta.get("tokenizer.ggml.add_space_prefix", False)), special,
        )
    except Exception as e:
        raise ModelLoadError(path, f"cannot build the tokenizer ({type(e).__name__}: {e})") from e
