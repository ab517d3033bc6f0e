"""Parity with Hugging Face transformers loading the same GGUF on the CPU (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.workers.runtime.forward import packed_logits
from workers.runtime.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise product copywriter."
CHATS = [
    [{"role": "user", "content": "Describe a stainless steel water bottle."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write one line about a wool hiking sock."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three words that rhyme with light."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a use for a canvas tote bag."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about the moon."}],
    [{"role": "user", "content": "Why do cast iron pans need seasoning? Café owners ask."}],
]


def test_chat_template_and_tokens_match(bundled_lm, hf_smollm):
    _, hf_tok = hf_smollm
    for chat in CHATS:
        ours = bundled_lm.render_chat(chat)
        theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert ours == list(theirs), chat


def test_logits_match_within_1e_3(bundled_lm, hf_smollm):
    hf_model, _ = hf_smollm
    prompts = [bundled_lm.render_chat(chat) for chat in CHATS]
    ours = packed_logits(bundled_lm, prompts)  # all 8 prompts in one packed varlen prefill
    worst = 0.0
    for prompt, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0].float()
        worst = max(worst, (mine - ref).abs().max().item())
    assert worst <= 1e-3, f"max |logit difference| {worst:.2e}"


def test_greedy_32_tokens_identical(bundled_lm, hf_smollm):
    hf_model, hf_tok = hf_smollm
    prompts = [bundled_lm.render_chat(chat) for chat in CHATS]
    requests = [GenerationRequest(str(i), p, SamplingParams(temperature=0, max_tokens=32))
                for i, p in enumerate(prompts)]
    results = bundled_lm.generate(requests)  # one batch of 8
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = out[0, len(prompt):].tolist()
        assert result.token_ids == expected
        assert result.text == hf_tok.decode(expected, skip_special_tokens=True)
