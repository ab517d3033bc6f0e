"""The feedback loop: rate a batch's lines, list the ratings, export them as a DPO or supervised fine-tune file."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, update

from db.batches import list_shards
from db.leases import ResultRow, record_unfenced_results
from db.models import Batch, BatchStatus, RequestOutcome, Tenant
from db.tenants import create_api_key, create_tenant
from tests.api.conftest import jsonl
from workers.batches.shard_files import read_shard_lines
from workers.registry import BUNDLED_MODEL_ID

CHAT = "/v1/chat/completions"
NOT_RUN = object()  # an answer for a line that has no result yet
COLOR, SUM, GREET, TRANSLATE = "Name a primary color.", "What is 2+2?", "Say hi.", "Translate 'chat'."
# custom_id -> (question, the model's answer: text, None for a failed request, or NOT_RUN)
LINES = {"a": (COLOR, "Blue."), "b": (COLOR, "I do not know."), "c": (SUM, "5"), "d": (GREET, "Hi!"),
         "e": (TRANSLATE, None), "f": (COLOR, "Green.")}
RATINGS = [{"custom_id": "a", "rating": "good"}, {"custom_id": "b", "rating": "bad", "comment": "unhelpful"},
           {"custom_id": "c", "rating": "bad", "corrected": "4"}, {"custom_id": "d", "rating": 3},
           {"custom_id": "e", "rating": 1, "corrected": "cat"}, {"custom_id": "f", "rating": 4}]


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def output_line(custom_id: str, answer: str | None) -> dict:
    if answer is None:
        return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": None,
                "error": {"code": "worker_failed", "message": "the worker stopped"}}
    body = {"id": f"chatcmpl-{custom_id}", "object": "chat.completion", "created": 1, "model": BUNDLED_MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{custom_id}", "body": body}, "error": None}


def finished_batch(http, auth: dict, app, session, lines: dict = LINES) -> str:
    """A batch created through the API whose requests got the given answers, as a worker records them."""
    requests = [{"custom_id": custom_id, "method": "POST", "url": CHAT,
                 "body": {"model": BUNDLED_MODEL_ID, "messages": messages(question)}}
                for custom_id, (question, _) in lines.items()]
    file_id = http.post("/v1/files", headers=auth, files={"file": ("in.jsonl", jsonl(requests))},
                        data={"purpose": "batch"}).json()["id"]
    batch_id = http.post("/v1/batches", headers=auth, json={"input_file_id": file_id, "endpoint": CHAT,
                                                            "completion_window": "24h"}).json()["id"]
    for shard in list_shards(session=session, batch_id=batch_id):
        results = [ResultRow(custom_id=line.custom_id, line_number=line.line,
                             outcome=RequestOutcome.FAILED if lines[line.custom_id][1] is None
                             else RequestOutcome.SUCCEEDED, output_line=output_line(line.custom_id,
                                                                                    lines[line.custom_id][1]))
                   for line in read_shard_lines(app.state.store, shard.input_key)
                   if lines[line.custom_id][1] is not NOT_RUN]
        record_unfenced_results(session=session, batch_id=batch_id, shard_id=shard.id, attempt=1, worker_id="w1",
                                results=results)
    session.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.COMPLETED))
    session.commit()
    return batch_id


@pytest.fixture
def auth(api_key) -> dict:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
def batch_id(http, auth, app, session) -> str:
    return finished_batch(http, auth, app, session)


def rate(http, auth, batch_id: str, ratings: list[dict]):
    return http.post(f"/v1/batches/{batch_id}/feedback", headers=auth, json={"ratings": ratings})


def export(http, auth, batch_id: str, **body):
    return http.post(f"/v1/batches/{batch_id}/feedback/export", headers=auth, json=body)


def test_a_later_rating_replaces_the_earlier_one(http, auth, batch_id) -> None:
    first = rate(http, auth, batch_id, [{"custom_id": "a", "rating": "good"}])
    assert first.status_code == 200, first.text
    stored = first.json()["data"]
    assert [(x["object"], x["batch_id"], x["custom_id"], x["rating"], x["score"], x["corrected"], x["comment"])
            for x in stored] == [("batch.feedback", batch_id, "a", "good", 5, None, None)]
    again = rate(http, auth, batch_id, [{"custom_id": "a", "rating": "bad", "corrected": "Red.", "comment": "no"},
                                        {"custom_id": "b", "rating": 2}, {"custom_id": "b", "rating": 5}])
    assert again.status_code == 200, again.text
    assert [(x["custom_id"], x["rating"], x["score"], x["corrected"]) for x in again.json()["data"]] == [
        ("a", "bad", 1, "Red."), ("b", 5, 5, None)]  # within one call too, the last rating of b wins
    listed = http.get(f"/v1/batches/{batch_id}/feedback", headers=auth).json()["data"]
    assert [(x["custom_id"], x["rating"], x["comment"]) for x in listed] == [("a", "bad", "no"), ("b", 5, None)]
    assert listed[0]["id"] == stored[0]["id"] and listed[0]["created_at"] == stored[0]["created_at"]
    assert listed[0]["updated_at"] >= listed[0]["created_at"]


def test_a_blank_correction_is_no_correction(http, auth, batch_id) -> None:
    stored = rate(http, auth, batch_id, [{"custom_id": "a", "rating": 4, "corrected": "  \n", "comment": ""}])
    assert [(x["corrected"], x["comment"]) for x in stored.json()["data"]] == [(None, None)]


def test_listing_pages_in_the_order_lines_were_first_rated(http, auth, batch_id) -> None:
    assert rate(http, auth, batch_id, RATINGS).status_code == 200
    assert rate(http, auth, batch_id, [{"custom_id": "a", "rating": 2}]).status_code == 200  # re-rated: not moved
    url = f"/v1/batches/{batch_id}/feedback"
    page = http.get(url, headers=auth, params={"limit": 4}).json()
    assert page["object"] == "list" and [x["custom_id"] for x in page["data"]] == ["a", "b", "c", "d"]
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
    assert page["data"][0]["rating"] == 2
    rest = http.get(url, headers=auth, params={"limit": 4, "after": page["last_id"]}).json()
    assert [x["custom_id"] for x in rest["data"]] == ["e", "f"] and rest["has_more"] is False
    empty = http.get(url, headers=auth, params={"after": rest["last_id"]}).json()
    assert empty["data"] == [] and empty["first_id"] is None and empty["has_more"] is False
    bad = http.get(url, headers=auth, params={"after": "batch_x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    assert http.get(url, headers=auth, params={"limit": 101}).status_code == 400


def test_an_unknown_custom_id_is_a_400_naming_it_and_nothing_is_stored(http, auth, app, session) -> None:
    batch_id = finished_batch(http, auth, app, session, {"a": (COLOR, "Blue."), "b": (COLOR, NOT_RUN)})
    response = rate(http, auth, batch_id, [{"custom_id": "a", "rating": "good"}, {"custom_id": "nope", "rating": 1},
                                           {"custom_id": "b", "rating": 2}])
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unknown_custom_id",
                                                              "ratings[1].custom_id")
    assert "'nope'" in error["message"] and "1 more" in error["message"]  # b has not run: no result to rate
    assert http.get(f"/v1/batches/{batch_id}/feedback", headers=auth).json()["data"] == []


@pytest.mark.parametrize(("rating", "param"), [
    ({"custom_id": "a", "rating": "meh"}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": 6}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": 0}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": True}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": "5"}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": 4.5}, "ratings.0.rating"),
    ({"custom_id": "a", "rating": "good", "corected": "typo"}, "ratings.0.corected"),
    ({"custom_id": "a", "rating": "good", "corrected": "x" * 100_001}, "ratings.0.corrected"),
    ({"custom_id": "", "rating": "good"}, "ratings.0.custom_id"),
    ({"rating": "good"}, "ratings.0.custom_id"),
])
def test_a_malformed_rating_is_a_400_naming_the_field(http, auth, batch_id, rating, param) -> None:
    response = rate(http, auth, batch_id, [rating])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_empty_or_missing_list_is_a_400(http, auth, batch_id) -> None:
    assert rate(http, auth, batch_id, []).json()["error"]["param"] == "ratings"
    missing = http.post(f"/v1/batches/{batch_id}/feedback", headers=auth, json={})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_required_parameter"


@pytest.fixture
def other(session, http, app):
    """Another tenant with a rated batch of its own."""
    tenant = create_tenant(session=session, name=f"other-{id(session)}")
    _, secret = create_api_key(session=session, tenant_id=tenant.id)
    session.commit()
    auth = {"Authorization": f"Bearer {secret}"}
    batch_id = finished_batch(http, auth, app, session)
    assert rate(http, auth, batch_id, RATINGS).status_code == 200
    yield {"auth": auth, "batch": batch_id}
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.commit()


def test_another_tenants_batch_is_404_on_every_feedback_route(http, auth, other) -> None:
    batch_id = other["batch"]
    calls = {"rate": rate(http, auth, batch_id, [{"custom_id": "a", "rating": "bad"}]),
             "list": http.get(f"/v1/batches/{batch_id}/feedback", headers=auth),
             "export": export(http, auth, batch_id, format="dpo"),
             "export with a bad body": export(http, auth, batch_id, format="nope")}  # 404 before the body
    for name, response in calls.items():
        assert response.status_code == 404, name
        assert response.json()["error"] == {"message": f"No such batch: {batch_id}", "type": "invalid_request_error",
                                            "param": "batch_id", "code": "not_found"}, name
    theirs = http.get(f"/v1/batches/{batch_id}/feedback", headers=other["auth"]).json()["data"]
    assert theirs[0]["custom_id"] == "a" and theirs[0]["rating"] == "good"  # untouched


def test_dpo_export(http, auth, batch_id) -> None:
    assert rate(http, auth, batch_id, RATINGS).status_code == 200
    response = export(http, auth, batch_id, format="dpo")
    assert response.status_code == 200, response.text
    file = response.json()
    assert (file["object"], file["purpose"], file["filename"], file["status"]) == (
        "file", "fine-tune", f"{batch_id}_feedback_dpo.jsonl", "processed")
    content = http.get(f"/v1/files/{file['id']}/content", headers=auth).content
    assert len(content) == file["bytes"] and content.endswith(b"\n")
    # a/b/f share the color question: best (a, good) over worst (b, bad), f (4) between them is left out;
    # c's correction over its output; d has no pair; e failed, so its correction has nothing to beat.
    assert [json.loads(line) for line in content.splitlines()] == [
        {"input": {"messages": messages(COLOR)}, "preferred_output": assistant("Blue."),
         "non_preferred_output": assistant("I do not know.")},
        {"input": {"messages": messages(SUM)}, "preferred_output": assistant("4"),
         "non_preferred_output": assistant("5")},
    ]
    listed = http.get("/v1/files", headers=auth, params={"purpose": "fine-tune"}).json()["data"]
    assert [x["id"] for x in listed] == [file["id"]]


def test_supervised_export(http, auth, batch_id) -> None:
    assert rate(http, auth, batch_id, RATINGS).status_code == 200
    response = export(http, auth, batch_id, format="supervised", filename="colors-sft.jsonl")
    assert response.status_code == 200, response.text
    file = response.json()
    assert (file["purpose"], file["filename"]) == ("fine-tune", "colors-sft.jsonl")
    content = http.get(f"/v1/files/{file['id']}/content", headers=auth).content
    # good and >= 4 answers as they were, corrections instead of the answer (e failed, its correction counts).
    assert [json.loads(line) for line in content.splitlines()] == [
        {"messages": [*messages(COLOR), *assistant("Blue.")]},
        {"messages": [*messages(SUM), *assistant("4")]},
        {"messages": [*messages(TRANSLATE), *assistant("cat")]},
        {"messages": [*messages(COLOR), *assistant("Green.")]},
    ]


def test_an_export_without_a_usable_pair_is_a_400_saying_why(http, auth, batch_id) -> None:
    nothing = export(http, auth, batch_id, format="dpo")
    assert nothing.status_code == 400 and nothing.json()["error"]["code"] == "no_feedback_pairs"
    assert "has no feedback" in nothing.json()["error"]["message"]
    unpaired = [{"custom_id": "d", "rating": 3}, {"custom_id": "e", "rating": "good"}, {"custom_id": "a", "rating": 2},
                {"custom_id": "b", "rating": 2}]
    assert rate(http, auth, batch_id, unpaired).status_code == 200
    response = export(http, auth, batch_id, format="dpo")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "no_feedback_pairs"
    assert error["message"] == (
        "The ratings give no dpo training example: 2 rated line(s) without a correction, rated the same as every "
        "other line of the same messages; 1 rated line(s) whose request failed, without a correction; 1 rated "
        "line(s) without a correction and with no other rated line of the same messages.")
    assert http.get("/v1/files", headers=auth, params={"purpose": "fine-tune"}).json()["data"] == []


def test_an_unknown_export_format_is_a_400(http, auth, batch_id) -> None:
    response = export(http, auth, batch_id, format="rlhf")
    assert response.status_code == 400 and response.json()["error"]["param"] == "format"
    assert export(http, auth, batch_id, format="dpo", filename="a\nb").json()["error"]["param"] == "filename"


@pytest.mark.parametrize("method", ["dpo", "supervised"])
def test_an_export_is_a_training_file_a_fine_tune_accepts(http, auth, app, session, client, method) -> None:
    questions = {f"q{n}": (f"Question {n}?", f"Wrong answer {n}.") for n in range(12)}  # OpenAI's floor is 10
    batch_id = finished_batch(http, auth, app, session, questions)
    corrections = [{"custom_id": cid, "rating": "bad", "corrected": f"Right answer {cid}."} for cid in questions]
    assert rate(http, auth, batch_id, corrections).status_code == 200
    file = export(http, auth, batch_id, format=method).json()
    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=file["id"], method={"type": method})
    assert job.training_file == file["id"] and job.status in ("validating_files", "queued")
