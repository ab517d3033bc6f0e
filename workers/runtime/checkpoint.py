"""Checkpoint: what a loader hands over -- config, neutral-named fp32 tensors, tokenizer, template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workers.runtime.config import ModelConfig
from workers.runtime.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A checkpoint read from disk, already converted to the decoder's conventions."""

    path: Path  # the .gguf file or the safetensors directory
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # weights.py neutral names, fp32 (or the file's float dtype), unfused
    tokenizer: Tokenizer
    chat_template: str | None  # jinja2 source, None when the checkpoint has none
