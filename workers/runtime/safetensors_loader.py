"""Hugging Face safetensors directory -> Checkpoint (config.json, *.safetensors, tokenizer files).

Names are mapped to weights.py's neutral names once; HF's q/k rows are already in the rotate-half
layout the decoder uses, so nothing is permuted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workers.runtime.checkpoint import Checkpoint
from workers.runtime.config import SUPPORTED_ARCHITECTURES, config_from_hf
from workers.runtime.errors import ModelLoadError
from workers.runtime.tokenizer import SpecialTokens, tokenizer_from_json
from workers.runtime.weights import NameMap, check_tensors

_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias", "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_NAMES = NameMap(_GLOBAL_NAMES, r"model\.layers\.(\d+)\.(.+)", _LAYER_NAMES)


def neutral_name(hf_name: str) -> str | None:
    """weights.py name of a transformers parameter, or None for one the decoder has no use for."""
    return _NAMES.neutral(hf_name)


def hf_name(neutral: str) -> str:
    """Inverse of neutral_name: the transformers parameter name (for writing safetensors exports)."""
    for hf, ours in _GLOBAL_NAMES.items():
        if ours == neutral:
            return hf
    layer, rest = neutral.removeprefix("layers.").split(".", 1)
    return f"model.layers.{layer}.{next(hf for hf, ours in _LAYER_NAMES.items() if ours == rest)}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(path, f"unreadable JSON ({type(e).__name__}: {e})") from e


def load_safetensors_dir(path: str | Path) -> Checkpoint:
    """Reads a transformers-style checkpoint directory; ModelLoadError naming the file for bad input."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(path, "directory not found")
    if not (path / "config.json").is_file():
        raise ModelLoadError(path / "config.json", "file not found")
    hf = _read_json(path / "config.json")
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(path / "config.json",
                             f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    try:
        config = config_from_hf(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(path / "config.json", f"bad model config ({type(e).__name__}: {e})") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(path, "no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    ours = neutral_name(name)
                    if ours == "output.weight" and config.tie_embeddings:
                        continue
                    if ours is None:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise ModelLoadError(file, f"unexpected tensor {name} for architecture {arch}")
                    tensors[ours] = f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(file, f"truncated or corrupt safetensors ({type(e).__name__}: {e})") from e
    problem = check_tensors(tensors, config)
    if problem:
        raise ModelLoadError(path, problem)
    tokenizer_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    chat_template = tokenizer_config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(path / "tokenizer.json", "file not found")
    try:
        tokenizer = tokenizer_from_json(path / "tokenizer.json", config.vocab_size,
                                        _special_tokens(path, hf, tokenizer_config))
    except (ValueError, KeyError) as e:
        raise ModelLoadError(path / "tokenizer.json", str(e)) from e
    return Checkpoint(path=path, config=config, tensors=tensors, tokenizer=tokenizer, chat_template=chat_template)


def _special_tokens(path: Path, hf: dict[str, Any], tokenizer_config: dict[str, Any]) -> SpecialTokens:
    """bos/eos/pad from config.json, generation_config.json and tokenizer_config.json."""
    spec = _read_json(path / "tokenizer.json")
    vocab = {**spec["model"]["vocab"], **{added["content"]: added["id"] for added in spec.get("added_tokens", [])}}
    spelling = {i: t for t, i in vocab.items()}

    def as_token(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    def ids(value: Any) -> list[int]:
        return [] if value is None else [int(v) for v in value] if isinstance(value, list) else [int(value)]

    generation = _read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    eos_token = as_token(tokenizer_config.get("eos_token"))
    bos_token = as_token(tokenizer_config.get("bos_token"))
    eos_ids = ids(generation.get("eos_token_id")) + ids(hf.get("eos_token_id"))
    if eos_token in vocab:
        eos_ids.append(vocab[eos_token])
    bos_id = hf.get("bos_token_id", vocab.get(bos_token) if bos_token else None)
    return SpecialTokens(
        bos_id=bos_id, eos_ids=tuple(dict.fromkeys(eos_ids)), pad_id=hf.get("pad_token_id"),
        bos_token=bos_token or (spelling.get(bos_id) if bos_id is not None else None),
        eos_token=eos_token or (spelling.get(eos_ids[0]) if eos_ids else None),
        add_bos=bool(tokenizer_config.get("add_bos_token", False)),
    )
