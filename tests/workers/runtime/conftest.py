"""Session fixtures: the bundled SmolLM2 in genq, and the same GGUF in Hugging Face transformers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def bundled_lm():
    """The registry's bundled model through the pipeline's loader, in fp32 (the parity tests' precision)."""
    from genq.settings import get_settings
    from workers.registry import BUNDLED_MODEL_ID
    from workers.runtime.loader import load_registered_model

    return load_registered_model(BUNDLED_MODEL_ID, get_settings().model_copy(update={"dtype": "float32"}))


@pytest.fixture(scope="session")
def hf_smollm():
    """(model, tokenizer) of the bundled GGUF loaded by transformers (dequantized to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.registry import bundled_gguf_path

    path = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ValueError as e:  # transformers wants accelerate for GGUF; its own converter works without it
        if "accelerate" not in str(e):
            raise
        model = _hf_model_without_accelerate(path)
    return model.eval(), tokenizer


def _hf_model_without_accelerate(path):
    """transformers' GGUF conversion (load_gguf_checkpoint) into a LlamaForCausalLM, sans accelerate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model
