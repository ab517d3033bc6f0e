"""Writing a checkpoint as a Hugging Face directory (config.json, model.safetensors, tokenizer files) that
transformers and genq's safetensors loader both read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.runtime.checkpoint import Checkpoint
from workers.runtime.config import config_to_hf
from workers.runtime.safetensors_loader import hf_name


def write_hf_dir(checkpoint: Checkpoint, tensors: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """checkpoint's config, tokenizer and chat template with `tensors` (neutral names) as its weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = checkpoint.tokenizer.special
    hf = config_to_hf(checkpoint.config) | {"torch_dtype": "float32", "bos_token_id": special.bos_id,
                                            "eos_token_id": list(special.eos_ids) or None,
                                            "pad_token_id": special.pad_id}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    save_file({hf_name(name): t.detach().to(torch.float32).contiguous() for name, t in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    checkpoint.tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": checkpoint.chat_template, "bos_token": special.bos_token, "eos_token": special.eos_token,
        "add_bos_token": special.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return directory
