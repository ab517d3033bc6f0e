"""Tokenizer files and chat templates, without the bundled model."""

from __future__ import annotations

import pytest
from tokenizers import processors

from tests.workers.runtime.tiny_checkpoints import BOS_ID, EOS_ID, tiny_backend_tokenizer
from workers.runtime.chat_template import ChatTemplateError, render_chat_template
from workers.runtime.tokenizer import SpecialTokens, tokenizer_from_json

SPECIAL = SpecialTokens(bos_id=BOS_ID, eos_ids=(EOS_ID,), pad_id=None, bos_token="<|im_start|>",
                        eos_token="<|im_end|>", add_bos=False)


def test_post_processor_bos_becomes_add_bos(tmp_path):
    backend = tiny_backend_tokenizer()
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", BOS_ID)])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_from_json(tmp_path / "tokenizer.json", 259, SPECIAL)
    assert tok.special.add_bos
    assert tok.encode("hi")[0] == BOS_ID and tok.encode("hi", add_bos=False)[0] != BOS_ID
    assert tok.decode(tok.encode("hi")) == "hi"


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    backend = tiny_backend_tokenizer()
    from tokenizers import decoders

    backend.decoder = decoders.Metaspace()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="byte-level BPE"):
        tokenizer_from_json(tmp_path / "tokenizer.json", 259, SPECIAL)


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_template_semantics():
    messages = [{"role": "user", "content": "café \"quoted\""}]
    text = render_chat_template(TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
    assert text == '<s>[user]"café \\"quoted\\""\n[assistant]'  # tojson keeps non-ASCII, as HF's does
    no_prompt = render_chat_template(TEMPLATE, messages, add_generation_prompt=False, bos_token="<s>")
    assert not no_prompt.endswith("[assistant]")
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        render_chat_template(TEMPLATE, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, messages)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", messages)
