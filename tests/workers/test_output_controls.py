"""Output controls without a real model: the constraint checker and cutter, and a line's choices
(n variants, candidates, constraints_not_met) through run_shard with a fake model that writes words."""

from __future__ import annotations

import json
import random

import pytest

from db.models import Batch, File
from db.session import session_scope
from storage import store_from_settings
from tests.workers.conftest import chat_line
from tests.workers.fake_model import FakeModel
from workers.batches.constraints import PRESETS, Constraints, check
from workers.batches.request_contract import RequestError, parse_body
from workers.batches.shard_runner import run_shard
from workers.runtime.types import GenerationRequest, GenerationResult

WORDS = ["warm", "cotton", "socks", "keep", "you", "dry", "on", "long", "trail", "days"]


class WordsModel(FakeModel):
    """Seeded sentences of WORDS (a period every few words), the seed chosen per candidate."""

    def complete(self, request: GenerationRequest) -> GenerationResult:
        rng = random.Random(request.params.seed)
        words = []
        for _ in range(request.params.max_tokens):
            words.append(rng.choice(WORDS) + ("." if rng.random() < 0.25 else ""))
        text = " ".join(words)
        tokens = list(text.encode())
        return GenerationResult(request_id=request.request_id, text=text, token_ids=tokens, finish_reason="length",
                                prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(tokens))


# --- the checker -----------------------------------------------------------------------------------


def test_cut_ends_at_a_word_boundary_within_max_chars():
    checked = check("Warm cotton socks for long trail days", Constraints(max_chars=20))
    assert checked.text == "Warm cotton socks" and not checked.violations
    assert len(checked.text) <= 20


def test_cut_prefers_a_finished_sentence_when_it_keeps_most_of_the_text():
    text = "Stay dry on the trail. These socks keep you warm all day and night long"
    # The sentence keeps 5 words: enough of 7 (two thirds), too few of 8.
    assert check(text, Constraints(max_words=8)).text == "Stay dry on the trail. These socks keep"
    assert check(text, Constraints(max_words=7)).text == "Stay dry on the trail."
    assert check(text, Constraints(max_words=7, min_words=6)).text == "Stay dry on the trail. These socks"
    long = "Stay dry on the long trail. They keep you warm"
    assert check(long, Constraints(max_words=8)).text == "Stay dry on the long trail."


def test_every_rule_is_checked():
    c = Constraints(min_words=4, banned=["acme"], banned_case_insensitive=True, required=["merino"])
    assert check("Better than ACME wool", c).violations == ["banned: contains 'acme'", "required: 'merino' missing"]
    assert check("Soft merino wool socks", c).violations == []
    assert check("Soft socks", c).violations[0] == "min_words: 2 words, at least 4 asked"


def test_banned_is_case_sensitive_unless_asked():
    assert check("Buy ACME", Constraints(banned=["acme"])).violations == []
    assert check("Buy ACME", Constraints(banned=["acme"], banned_case_insensitive=True)).violations


def test_presets_set_max_chars_and_an_explicit_lower_limit_wins():
    assert Constraints(preset="google_ads_headline").max_chars == PRESETS["google_ads_headline"] == 30
    assert Constraints(preset="sms", max_chars=100).max_chars == 100
    assert Constraints(preset="sms", max_chars=500).max_chars == 160


@pytest.mark.parametrize(("constraints", "param"), [
    ({"preset": "tiktok"}, "constraints.preset"),
    ({"min_words": 5, "max_words": 2}, "constraints"),
    ({"banned": ["!"], "required": ["wow!"]}, "constraints"),
    ({"max_chars": 3, "required": ["merino"]}, "constraints"),
])
def test_bad_constraints_are_request_errors(constraints, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "constraints": constraints}
    with pytest.raises(RequestError) as err:
        parse_body("/v1/chat/completions", body)
    assert err.value.param == param, err.value


def test_constraints_with_a_json_format_are_refused():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "constraints": {"max_chars": 9},
            "response_format": {"type": "json_object"}}
    with pytest.raises(RequestError, match="limit fields in the schema"):
        parse_body("/v1/chat/completions", body)


# --- a line's choices through run_shard --------------------------------------------------------------


def _output(settings, batch_id) -> tuple[list[dict], list[dict]]:
    """(output lines, error lines) of a finished batch."""
    with session_scope(settings.database_url) as session:
        batch = session.get(Batch, batch_id)
        keys = [session.get(File, fid).storage_key if fid else None for fid in (batch.output_file_id,
                                                                                  batch.error_file_id)]
    store = store_from_settings(settings)
    out, errors = ([json.loads(x) for x in store.get_bytes(k).splitlines()] if k else [] for k in keys)
    return out, errors


def _run_all(settings, made, model):
    for shard_id in made.shard_ids:
        run_shard(settings=settings, shard_id=shard_id, worker_id="w", model_loader=lambda _m: model)


def test_n_choices_are_distinct_and_reproducible(settings, make_batch):
    lines = [chat_line(f"r{i}", f"product {i}", n=4, temperature=0.8, seed=7, max_tokens=6) for i in range(2)]
    runs = []
    for _ in range(2):
        made = make_batch(lines)
        _run_all(settings, made, WordsModel())
        out, errors = _output(settings, made.batch_id)
        assert errors == [] and len(out) == 2
        runs.append([[c["message"]["content"] for c in line["response"]["body"]["choices"]] for line in out])
    assert runs[0] == runs[1]  # the same seed, the same variants
    for choices in runs[0]:
        assert len(choices) == 4 and len(set(choices)) == 4
    body = out[0]["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["candidates"] >= 4 and body["genq"]["candidates"] == body["usage"]["candidates"]


def test_constraints_are_kept_or_the_line_fails_with_its_nearest_candidate(settings, make_batch):
    kept = chat_line("kept", "socks", temperature=1.0, max_tokens=12,
                     constraints={"max_words": 6, "min_words": 3, "required": ["cotton"]})
    impossible = chat_line("impossible", "socks", temperature=1.0, max_tokens=12,
                           constraints={"required": ["cashmere"]})
    made = make_batch([kept, impossible])
    _run_all(settings, made, WordsModel())
    out, errors = _output(settings, made.batch_id)
    [line] = out
    text = line["response"]["body"]["choices"][0]["message"]["content"]
    assert 3 <= len(text.split()) <= 6 and "cotton" in text
    assert line["response"]["body"]["genq"]["constraints_enforced"] == ["max_words", "min_words", "required"]
    [failed] = errors
    error = failed["response"]["body"]["error"]
    assert failed["custom_id"] == "impossible" and failed["response"]["status_code"] == 400
    assert error["code"] == "constraints_not_met" and error["candidates"] == settings.max_candidates_per_choice
    assert error["violations"] == ["required: 'cashmere' missing"] and error["nearest_candidate"]


def test_greedy_lines_get_one_candidate_per_choice(settings, make_batch):
    made = make_batch([chat_line("g", "socks", temperature=0, constraints={"required": ["cashmere"]})])
    _run_all(settings, made, WordsModel())
    _, [failed] = _output(settings, made.batch_id)
    assert failed["response"]["body"]["error"]["candidates"] == 1
