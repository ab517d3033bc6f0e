"""/v1/fine_tuning/jobs through the official SDK: create, list, retrieve, cancel, events, checkpoints; every
refusal a 400/404 with its code; fine-tuned models are their tenant's alone (models list, batches, delete)."""

from __future__ import annotations

import io
import json

import openai
import pytest

from db.fine_tuning import add_model
from db.models import FineTuningJob
from db.tenants import create_api_key, create_tenant
from tests.api.conftest import chat_line, jsonl, sft_lines
from workers.registry import BUNDLED_MODEL_ID


def _upload(client, lines, purpose="fine-tune") -> str:
    return client.files.create(file=("train.jsonl", io.BytesIO(jsonl(lines))), purpose=purpose).id


def _dpo_lines(count: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"Describe {i}."}]},
             "preferred_output": [{"role": "assistant", "content": f"{i} is sturdy. Made to last."}],
             "non_preferred_output": [{"role": "assistant", "content": f"{i} is great!!!"}]} for i in range(count)]


def _refusal(call) -> dict:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return {"status": caught.value.status_code, **caught.value.body}


def test_create_list_retrieve_cancel_and_events(client) -> None:
    training = _upload(client, sft_lines(12))
    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=training, suffix="voice", seed=3,
                                         metadata={"team": "catalog"},
                                         method={"type": "supervised",
                                                 "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert job.id.startswith("ftjob-") and job.status == "queued" and job.seed == 3 and job.fine_tuned_model is None
    assert job.method.type == "supervised" and job.training_file == training
    other = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=training)
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    listed = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [other.id] and listed.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "catalog"}).data] == [job.id]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert [e.message for e in events] == ["Fine-tuning job cancelled", "Created fine-tuning job"]
    assert client.fine_tuning.jobs.list_events(job.id, after=events[0].id).data[0].id == events[1].id
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []


@pytest.mark.parametrize(("make", "code", "param"), [
    (lambda c: {"training_file": _upload(c, sft_lines(5))}, "too_few_examples", "training_file"),
    (lambda c: {"training_file": _upload(c, sft_lines(11) + [{"messages": [{"role": "user", "content": "hi"}]}])},
     "missing_assistant_turn", "training_file"),
    (lambda c: {"training_file": _upload(c, _dpo_lines(11) + [{"input": {"messages": []}}]),
                "method": {"type": "dpo"}}, "invalid_dpo_line", "training_file"),
    (lambda c: {"training_file": _upload(c, sft_lines(12)), "model": "llama-70b"}, "model_not_found", "model"),
    (lambda c: {"training_file": _upload(c, sft_lines(12)), "validation_file": _upload(c, _dpo_lines(12))},
     "format_mismatch", "validation_file"),
    (lambda c: {"training_file": _upload(c, sft_lines(12)),
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 51}}}},
     "invalid_value", "method.supervised.hyperparameters.n_epochs"),
    (lambda c: {"training_file": _upload(c, sft_lines(12)),
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}},
     "invalid_value", "method.dpo.hyperparameters.beta"),
    (lambda c: {"training_file": _upload(c, [chat_line("a")], purpose="batch")}, "invalid_file_purpose",
     "training_file"),
])
def test_bad_input_is_refused_with_its_code(client, make, code, param) -> None:
    body = {"model": BUNDLED_MODEL_ID} | make(client)
    refused = _refusal(lambda: client.fine_tuning.jobs.create(**body))
    assert refused["status"] == 400 and refused["code"] == code and refused["param"] == param, refused


def test_a_bad_line_is_named(client) -> None:
    lines = sft_lines(12)
    lines[6] = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}
    refused = _refusal(lambda: client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID,
                                                               training_file=_upload(client, lines)))
    assert refused["code"] == "invalid_training_file" and refused["line"] == 7 and "line 7" in refused["message"]


@pytest.fixture
def neighbour(session, http):
    """Another tenant and its SDK client."""
    tenant = create_tenant(session=session, name=f"neighbour-{id(session)}")
    _, secret = create_api_key(session=session, tenant_id=tenant.id)
    session.commit()
    yield tenant, openai.OpenAI(api_key=secret, base_url="http://testserver/v1", http_client=http, max_retries=0)
    session.delete(tenant)
    session.commit()


def test_fine_tuned_models_are_their_tenants_alone(client, session, tenant, neighbour, store) -> None:
    other_tenant, other = neighbour
    foreign_file = _upload(other, sft_lines(12))
    refused = _refusal(lambda: client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=foreign_file))
    assert refused["status"] == 404 and refused["param"] == "training_file"

    job = client.fine_tuning.jobs.create(model=BUNDLED_MODEL_ID, training_file=_upload(client, sft_lines(12)))
    name = f"ft:{BUNDLED_MODEL_ID}:{tenant.name}::{job.id.removeprefix('ftjob-')}"
    store.put_bytes("fine_tunes/x/model/adapter_config.json", b"{}")
    add_model(session=session, model_id=name, tenant_id=tenant.id, job_id=job.id, base_model=BUNDLED_MODEL_ID,
              adapter_key="fine_tunes/x/model/", checkpoint_step=None, metrics=None)
    session.commit()
    assert name in [m.id for m in client.models.list().data]
    assert client.models.retrieve(name).id == name
    assert name not in [m.id for m in other.models.list().data]
    assert _refusal(lambda: other.models.retrieve(name))["status"] == 404

    # A batch may name it for its tenant, and its shard goes to the base model's workers.
    lines = [chat_line("base"), chat_line("tuned", model=name)]
    batch = client.batches.create(input_file_id=_upload(client, lines, purpose="batch"),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    assert set(batch.model.split(",")) == {BUNDLED_MODEL_ID, name}
    from db.batches import list_shards

    assert {s.queue for s in list_shards(session=session, batch_id=batch.id)} == {f"genq.{BUNDLED_MODEL_ID}"}
    foreign_batch = _upload(other, [chat_line("x", model=name)], purpose="batch")
    refused = _refusal(lambda: other.batches.create(input_file_id=foreign_batch, endpoint="/v1/chat/completions",
                                                    completion_window="24h"))
    assert refused["status"] == 400 and refused["code"] == "model_not_found" and refused["line"] == 1

    assert _refusal(lambda: other.models.delete(name))["status"] == 404
    assert _refusal(lambda: client.models.delete(BUNDLED_MODEL_ID))["code"] == "model_not_deletable"
    assert client.models.delete(name).deleted
    assert name not in [m.id for m in client.models.list().data]
    assert not store.exists("fine_tunes/x/model/adapter_config.json")
    session.expire_all()
    assert session.get(FineTuningJob, job.id) is not None  # the job's record stays
    assert json.loads(json.dumps(client.fine_tuning.jobs.retrieve(job.id).to_dict()))["id"] == job.id
