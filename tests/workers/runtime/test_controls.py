"""The engine's output controls on the bundled model: banned strings never appear (across token
boundaries, in any case when asked), limits end the text, min_words holds, JSON follows its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from workers.batches.constraints import Constraints, check
from workers.runtime.types import DecodingControls, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PRODUCTS = ["a merino wool hiking sock", "a stainless steel water bottle", "a waterproof rain jacket",
            "a cotton canvas tote bag", "an aluminium camping lantern", "a bamboo cutting board"]


def _requests(lm, controls, *, prompt="Write an exciting ad for {}!", max_tokens=48, temperature=0.8):
    return [GenerationRequest(request_id=f"r{i}", prompt_token_ids=lm.render_chat(
        [{"role": "user", "content": prompt.format(product)}]),
        params=SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens), controls=controls)
        for i, product in enumerate(PRODUCTS)]


def test_banned_strings_never_appear(bundled_lm):
    plain = bundled_lm.generate(_requests(bundled_lm, None))
    assert any("!" in r.text or " the " in r.text.lower() for r in plain)  # the prompt invites both
    banned = DecodingControls(banned=["!", " THE ", "amazing"], banned_case_insensitive=True)
    for result in bundled_lm.generate(_requests(bundled_lm, banned)):
        text = result.text.lower()
        assert "!" not in text and " the " not in text and "amazing" not in text, result.text
        assert result.completion_tokens > 10


def test_word_limits_end_the_text_and_the_cut_keeps_them(bundled_lm):
    controls = DecodingControls(min_words=12, max_words=20)
    results = bundled_lm.generate(_requests(bundled_lm, controls, prompt="Describe {}.", max_tokens=96))
    rules = Constraints(min_words=12, max_words=20)
    for result in results:
        words = result.text.split()
        assert len(words) <= 21, result.text  # one word past the limit started, then end-of-text was forced
        if result.finish_reason == "stop":  # end-of-text, never before 12 words
            assert len(words) >= 12, result.text
        cut = check(result.text, rules).text.split()
        n = len(cut)  # whole words of the text (a trailing comma dropped)
        assert n <= 20 and cut[:-1] == words[:n - 1] and words[n - 1].rstrip(",;:") == cut[-1]


def test_headline_preset_never_exceeds_30_characters_nor_cuts_a_word(bundled_lm):
    rules = Constraints(preset="google_ads_headline")
    controls = DecodingControls(max_chars=rules.max_chars)
    results = bundled_lm.generate(_requests(bundled_lm, controls, prompt="Write a headline for {}."))
    for result in results:
        cut = check(result.text, rules).text
        assert 0 < len(cut) <= 30
        assert result.text.strip().startswith(cut)
        rest = result.text.strip()[len(cut):]
        assert rest == "" or rest[0].isspace(), (cut, result.text)  # a whole word ends the cut


def test_json_schema_output_validates(bundled_lm):
    schema = {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "headline": {"type": "string", "maxLength": 40},
        "bullets": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 3, "maxItems": 3}},
        "required": ["title", "headline", "bullets"], "additionalProperties": False}
    controls = DecodingControls(json_schema=json.dumps(schema))
    results = bundled_lm.generate(_requests(bundled_lm, controls, prompt="Describe {} in JSON.", max_tokens=400))
    for result in results:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)


def test_logit_bias_forbids_a_token(bundled_lm):
    plain = bundled_lm.generate(_requests(bundled_lm, None, temperature=0, max_tokens=16))
    first = plain[0].token_ids[0]
    biased = bundled_lm.generate(_requests(bundled_lm, DecodingControls(logit_bias={first: -100}),
                                           temperature=0, max_tokens=16))
    assert all(first not in r.token_ids for r in biased)


def test_required_terms_are_written_before_the_text_ends(bundled_lm):
    terms = ["recycled polyester", "Gore-Tex"]  # terms no product of the prompt names
    controls = DecodingControls(required=terms, max_words=40)
    for result in bundled_lm.generate(_requests(bundled_lm, controls, prompt="Describe {}.", max_tokens=80)):
        assert all(t.lower() in result.text.lower() for t in terms), result.text
