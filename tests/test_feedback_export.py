"""genq.feedback_export: ratings, messages and outputs -> DPO and supervised training lines."""

from __future__ import annotations

import json

import pytest

from genq.feedback_export import (
    ExportFormat,
    RatedLine,
    RatingError,
    SkipReason,
    build_examples,
    correction_text,
    output_content,
    rating_score,
    request_messages,
    training_jsonl,
)

CHAT = "/v1/chat/completions"
DPO, SFT = ExportFormat.DPO, ExportFormat.SUPERVISED


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def line(number: int, score: int, output: str | None, *, corrected: str | None = None,
         messages: list[dict] | None = None) -> RatedLine:
    return RatedLine(custom_id=f"r{number}", line_number=number, score=score, corrected=corrected,
                     messages=user("q") if messages is None else messages, output=output)


def pair(messages: list[dict], preferred: str, non_preferred: str) -> dict:
    return {"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


@pytest.mark.parametrize(("rating", "score"), [("good", 5), ("bad", 1), (1, 1), (3, 3), (5, 5)])
def test_rating_scores(rating, score) -> None:
    assert rating_score(rating) == score


@pytest.mark.parametrize("rating", ["Good", "meh", "4", 0, 6, True, 4.0, None, [5]])
def test_other_ratings_are_refused(rating) -> None:
    with pytest.raises(RatingError, match="must be 'good', 'bad' or an integer from 1 to 5"):
        rating_score(rating)


def test_a_blank_correction_is_none() -> None:
    assert [correction_text(x) for x in (None, "", " \n\t", " 4 ")] == [None, None, None, " 4 "]


def test_output_content_reads_only_successful_chat_answers() -> None:
    ok = {"custom_id": "a", "response": {"status_code": 200, "body": {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Blue."}}]}}, "error": None}
    assert output_content(ok) == "Blue."
    http_error = {"custom_id": "a", "response": {"status_code": 400, "body": {"error": {"message": "x"}}}}
    expired = {"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": "expired"}}
    completion = {"response": {"status_code": 200, "body": {"choices": [{"text": "Blue."}]}}}
    for other in (http_error, expired, completion, {"response": {"status_code": 200, "body": {"choices": []}}},
                  "not a line", None):
        assert output_content(other) is None


def test_request_messages_are_what_the_worker_reads() -> None:
    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                    {"type": "text", "text": "there"}]}]}
    assert request_messages(CHAT, body) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi there"}]
    assert request_messages("/v1/completions", {"model": "m", "prompt": "Hi"}) is None
    assert request_messages(CHAT, {"model": "m", "messages": "Hi"}) is None
    assert request_messages(CHAT, "not a body") is None


def test_dpo_prefers_a_correction_over_the_output() -> None:
    export = build_examples([line(1, 1, "5", corrected="4")], DPO)
    assert export.examples == [pair(user("q"), "4", "5")] and not export.skipped


def test_dpo_pairs_the_best_with_the_worst_output_of_the_same_messages() -> None:
    color, greet = user("color?"), user("greet")
    lines = [line(4, 5, "Hi!", messages=greet), line(1, 3, "Teal.", messages=color),
             line(2, 5, "Blue.", messages=color), line(3, 1, "Dunno.", messages=color),
             line(5, 5, "Red.", messages=color), line(6, 1, "Hello", messages=greet)]
    export = build_examples(lines, DPO)
    # Ties go to the earliest line (2 over 5); examples in the order of their first input line.
    assert export.examples == [pair(color, "Blue.", "Dunno."), pair(greet, "Hi!", "Hello")]
    assert export.skipped == {SkipReason.BETWEEN: 2}  # lines 1 and 5


def test_dpo_skips_what_makes_no_pair_and_says_why() -> None:
    lines = [line(1, 3, "a", messages=user("alone")), line(2, 2, "b", messages=user("same")),
             line(3, 2, "c", messages=user("same")), line(4, 1, None), line(5, 1, None, corrected="x"),
             line(6, 1, "same", corrected="same"),
             RatedLine(custom_id="r7", line_number=7, score=5, corrected=None, messages=None, output="d")]
    export = build_examples(lines, DPO)
    assert export.examples == []
    assert export.skipped == {SkipReason.UNPAIRED: 1, SkipReason.SAME_RATING: 2, SkipReason.FAILED: 1,
                              SkipReason.FAILED_CORRECTED: 1, SkipReason.SAME_AS_OUTPUT: 1, SkipReason.NOT_CHAT: 1}
    assert export.why_empty().startswith("The ratings give no dpo training example: 2 rated line(s) without a "
                                         "correction, rated the same as every other line of the same messages; ")


def test_examples_the_fine_tuning_contract_refuses_are_left_out() -> None:
    tool_turn = [*user("weather?"), {"role": "tool", "content": "sunny"}]
    ends_with_assistant = [*user("hi"), {"role": "assistant", "content": "Hel"}]
    lines = [line(1, 1, "Blue. ", corrected="Blue."),  # identical once stripped: no preference
             line(2, 1, "rainy", corrected="sunny", messages=tool_turn),
             line(3, 1, "lo", corrected="Hello", messages=ends_with_assistant),
             line(4, 1, "5", corrected="4")]
    export = build_examples(lines, DPO)
    assert export.examples == [pair(user("q"), "4", "5")]
    assert export.skipped == {SkipReason.REFUSED: 3}
    only_refused = build_examples(lines[:1], DPO)
    assert only_refused.why_empty() == (
        "The ratings give no dpo training example: 1 rated line(s) whose example the fine-tuning file contract "
        "refuses (the preferred and non-preferred outputs are identical).")


def test_supervised_keeps_corrections_and_accepted_outputs() -> None:
    lines = [line(1, 5, "Blue."), line(2, 4, "Teal."), line(3, 3, "Maybe."), line(4, 1, "5", corrected="4"),
             line(5, 1, None, corrected="cat"), line(6, 5, None), line(7, 5, "", messages=user("empty"))]
    export = build_examples(lines, SFT)
    assistant = [{"role": "assistant"}]
    assert export.examples == [{"messages": [*user("q"), assistant[0] | {"content": text}]}
                               for text in ("Blue.", "Teal.", "4", "cat")]
    assert export.skipped == {SkipReason.NOT_ACCEPTED: 1, SkipReason.FAILED: 1, SkipReason.REFUSED: 1}


def test_training_jsonl_is_one_compact_utf8_line_per_example() -> None:
    examples = [{"messages": user("café")}, {"messages": user("b")}]
    data = training_jsonl(examples)
    assert data == ('{"messages":[{"role":"user","content":"café"}]}\n'
                    '{"messages":[{"role":"user","content":"b"}]}\n').encode()
    assert [json.loads(x) for x in data.splitlines()] == examples
