"""The bundled SmolLM2-135M-Instruct through load_model: real answers, seeds, exports, tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from tests.workers.runtime.forward import packed_logits
from workers.registry import BUNDLED_MODEL_ID, bundled_gguf_path
from workers.runtime.config import config_to_hf
from workers.runtime.gguf_loader import load_gguf
from workers.runtime.loader import load_checkpoint, load_model
from workers.runtime.safetensors_loader import hf_name
from workers.runtime.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

BOTTLE = [{"role": "user", "content": "Write a short product description of a stainless steel water bottle."}]


def test_load_model_is_cached_and_sized(bundled_lm):
    served = load_model(BUNDLED_MODEL_ID)  # settings' dtype: bf16 on a CPU with bf16 matmuls
    assert load_model(BUNDLED_MODEL_ID) is served and served.context_length == 8192
    assert bundled_lm.context_length == 8192
    assert bundled_lm.config.n_layers == 30 and bundled_lm.config.tie_embeddings


def test_answers_a_real_chat_prompt_greedy_and_deterministic(bundled_lm):
    ids = bundled_lm.render_chat(BOTTLE)
    request = GenerationRequest("bottle", ids, SamplingParams(temperature=0, max_tokens=32))
    first = bundled_lm.generate([request, request])  # the same request twice in one batch
    assert first[0].token_ids == first[1].token_ids
    text = first[0].text
    assert "bottle" in text.lower(), text
    assert first[0].finish_reason in ("stop", "length") and first[0].error is None


def test_short_answer_stops_on_eos(bundled_lm):
    ids = bundled_lm.render_chat([{"role": "user", "content": "Reply with just the word yes."}])
    [r] = bundled_lm.generate([GenerationRequest("y", ids, SamplingParams(temperature=0, max_tokens=40))])
    assert r.finish_reason == "stop" and r.token_ids[-1] in bundled_lm.tokenizer.special.eos_ids
    assert "<|im_end|>" not in r.text


def test_seed_same_alone_and_in_batch_of_16(bundled_lm):
    chats = ["Describe a cotton t-shirt.", "Name a fruit.", "Write a haiku about rain.", "What is tea?"]
    prompts = [bundled_lm.render_chat([{"role": "user", "content": c}]) for c in chats]
    probe_params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=42)
    probe = GenerationRequest("probe", prompts[0], probe_params)
    [alone] = bundled_lm.generate([probe])
    mixed = []
    for i in range(15):
        params = SamplingParams(
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4], top_p=[1.0, 0.9, 0.5][i % 3], top_k=[0, 20][i % 2],
            min_p=0.05 * (i % 2), presence_penalty=0.5 * (i % 3 == 1), frequency_penalty=0.3 * (i % 5 == 2),
            repetition_penalty=1.2 if i % 4 == 3 else 1.0, seed=i, max_tokens=2 + i % 12, logprobs=i % 2 == 0,
            stop=["."] if i % 6 == 5 else [],
        )
        mixed.append(GenerationRequest(f"m{i}", prompts[i % 4], params))
    batch = mixed[:7] + [probe] + mixed[7:]
    results = bundled_lm.generate(batch)
    assert [r.request_id for r in results] == [r.request_id for r in batch]
    assert results[7].token_ids == alone.token_ids
    again = bundled_lm.generate([GenerationRequest("probe", prompts[0], probe_params)])
    assert again[0].token_ids == alone.token_ids
    other = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=43)
    [different] = bundled_lm.generate([GenerationRequest("probe", prompts[0], other)])
    assert different.token_ids != alone.token_ids


def test_safetensors_export_gives_the_same_logits(bundled_lm, tmp_path):
    """A transformers-style directory written from the GGUF's weights loads to the same logits."""
    from safetensors.torch import save_file

    checkpoint = load_gguf(bundled_gguf_path())
    hf_config = config_to_hf(checkpoint.config) | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file({hf_name(k): v.contiguous() for k, v in checkpoint.tensors.items()}, str(tmp_path / "model.safetensors"))
    checkpoint.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": checkpoint.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    exported = load_checkpoint(tmp_path)
    prompts = [bundled_lm.render_chat(BOTTLE), bundled_lm.encode("The quick brown fox")]
    assert exported.render_chat(BOTTLE) == prompts[0]
    assert exported.encode("The quick brown fox") == prompts[1]
    assert exported.tokenizer.special.eos_ids == bundled_lm.tokenizer.special.eos_ids
    for a, b in zip(packed_logits(bundled_lm, prompts), packed_logits(exported, prompts), strict=True):
        assert torch.equal(a, b)


def test_tokenizer_round_trip_and_digits(bundled_lm):
    tok = bundled_lm.tokenizer
    text = "Ünïcode café — naïve 😀 <|im_start|> tokens"
    ids = tok.encode(text)
    assert tok.backend.token_to_id("<|im_start|>") in ids  # special spelling matched whole
    assert tok.decode(ids) == text.replace("<|im_start|>", "")  # control tokens decode to nothing
    # SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split numbers into single digits.
    assert len(tok.encode("2024")) == 4
