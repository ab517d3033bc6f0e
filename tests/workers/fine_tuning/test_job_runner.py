"""The fine-tune job kind end to end on a tiny model: create (the API's checks), train in segments under
the lease, checkpoints, the published model served by the runtime; a crash resumes from the last
segment and ends where an uninterrupted run ends; cancel stops within a segment."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from api.fine_tune_service import create_fine_tune
from api.fine_tuning_schemas import CreateFineTuningJobRequest
from db.files import create_file, file_storage_key, new_file_id
from db.fine_tuning import cancel, checkpoints, list_events, tenant_model
from db.models import File, FineTuneStatus, FineTuningJob, Shard, ShardStatus
from db.session import session_scope
from storage import store_from_settings
from tests.workers.fine_tuning.conftest import chat_lines
from workers.fine_tuning import job_runner
from workers.fine_tuning.job_runner import run_fine_tune_shard
from workers.shard_outcome import ShardRun

TINY = "tiny-llama"


@pytest.fixture
def tuning(settings, tiny_dir, tmp_path):
    """settings whose registry serves the tiny model, training one step per segment."""
    models = tmp_path / "tuning-models.json"
    models.write_text(json.dumps({TINY: {"source": str(tiny_dir), "context_length": 256}}))
    return settings.model_copy(update={"models_file": models, "fine_tune_segment_seconds": 0.0,
                                       "fine_tune_max_length": 64})


def _create(settings, tenant_id, *, epochs=3, seed=7, lines=None):
    store = store_from_settings(settings)
    file_id = new_file_id()
    store.put_bytes(file_storage_key(file_id), ("\n".join(lines or chat_lines(16)) + "\n").encode())
    body = CreateFineTuningJobRequest(model=TINY, training_file=file_id, suffix="brand", seed=seed, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 4,
                                                                 "learning_rate_multiplier": 2.0}}},
        lora={"rank": 4, "alpha": 8})
    with session_scope(settings.database_url) as session:
        create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="train.jsonl",
                    purpose="fine-tune", size=1)
        job, shard = create_fine_tune(session=session, store=store, settings=settings, tenant_id=tenant_id, body=body)
        return job.id, shard.id


def _job(settings, job_id) -> FineTuningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(FineTuningJob, job_id)
        session.expunge(job)
        return job


def _final_valid_loss(settings, job_id) -> float:
    with session_scope(settings.database_url) as session:
        events, _ = list_events(session=session, job_id=job_id, after=None, limit=1000)
        return next(e.data["full_valid_loss"] for e in events if e.type == "metrics" and e.data.get("full_valid_loss"))


def test_a_fine_tune_trains_checkpoints_and_serves_its_model(tuning, tenant_id, tmp_path) -> None:
    job_id, shard_id = _create(tuning, tenant_id, epochs=4)
    outcome = run_fine_tune_shard(settings=tuning, shard_id=shard_id, worker_id="w1")
    assert outcome.status == ShardRun.DONE, outcome
    job = _job(tuning, job_id)
    assert job.status == FineTuneStatus.SUCCEEDED and job.error is None
    assert job.fine_tuned_model.startswith(f"ft:{TINY}:") and job.fine_tuned_model.split(":")[3] == "brand"
    assert job.hyperparameters == {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert job.trained_tokens > 0 and job.step == job.total_steps == 4 * 4  # 14 examples / 4 per step
    with session_scope(tuning.database_url) as session:
        events, _ = list_events(session=session, job_id=job_id, after=None, limit=1000)
        kept = checkpoints(session=session, job_id=job_id)
        model = tenant_model(session=session, tenant_id=tenant_id, model_id=job.fine_tuned_model)
        results = session.get(File, job.result_files[0])
        assert session.scalar(select(Shard.status).where(Shard.id == shard_id)) == ShardStatus.DONE
    messages = [e.message for e in reversed(events)]
    assert messages[0] == "Created fine-tuning job" and messages[1].startswith("Prepared 14 training and 2 validation")
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)
    # One checkpoint per epoch but the last (the final model is that one), the newest 3 kept.
    assert [c.checkpoint_step for c in kept] == [12, 8, 4] and model is not None and model.checkpoint_step is None
    csv = store_from_settings(tuning).get_bytes(results.storage_key).decode().splitlines()
    assert results.purpose == "fine-tune-results" and csv[0] == "step,train_loss,train_accuracy,valid_loss," \
        "valid_mean_token_accuracy" and len(csv) > 2

    from workers.runtime.loader import load_registered_model
    from workers.runtime.types import GenerationRequest, SamplingParams

    served = load_registered_model(job.fine_tuned_model, tuning)
    prompt = served.render_chat([{"role": "system", "content": "greet"}, {"role": "user", "content": "name: Ada0"}])
    [result] = served.generate([GenerationRequest(request_id="r", prompt_token_ids=prompt,
                                                  params=SamplingParams(temperature=0.0, max_tokens=4))])
    assert len(result.token_ids) >= 1

    # `genq export --merged`: a Hugging Face directory that genq and transformers load to the same logits.
    import torch
    from transformers import AutoModelForCausalLM

    from tests.workers.runtime.forward import packed_logits
    from workers.fine_tuning.serving import export_merged, merged_weights
    from workers.runtime.loader import load_checkpoint, serve_checkpoint

    directory = export_merged(job.fine_tuned_model, tmp_path / "merged", tuning)
    exported = load_checkpoint(directory)
    assert exported.render_chat([{"role": "user", "content": "hi"}]) == served.render_chat([{"role": "user",
                                                                                           "content": "hi"}])
    checkpoint, state, _ = merged_weights(job.fine_tuned_model, tuning)
    merged = serve_checkpoint(checkpoint, state, device="cpu", dtype=torch.float32, model_id="m", context_length=256,
                              engine_config=None)
    [ours] = packed_logits(merged, [prompt])
    assert torch.equal(packed_logits(exported, [prompt])[0], ours)
    hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    for lm in (served, exported, merged):
        lm.loop.close()


def test_a_crashed_attempt_resumes_from_its_last_segment(tuning, tenant_id, monkeypatch) -> None:
    straight_id, straight_shard = _create(tuning, tenant_id, epochs=2, seed=11)
    assert run_fine_tune_shard(settings=tuning, shard_id=straight_shard, worker_id="w1").status == ShardRun.DONE

    job_id, shard_id = _create(tuning, tenant_id, epochs=2, seed=11)
    real = job_runner.Trainer.run_segment
    calls = []

    def crash_on_the_fourth(self, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("worker killed")
        return real(self, **kwargs)

    monkeypatch.setattr(job_runner.Trainer, "run_segment", crash_on_the_fourth)
    first = run_fine_tune_shard(settings=tuning, shard_id=shard_id, worker_id="w1")
    assert first.status == ShardRun.RELEASED and "worker killed" in first.error
    assert _job(tuning, job_id).step == 3  # three one-step segments were saved
    monkeypatch.setattr(job_runner.Trainer, "run_segment", real)
    second = run_fine_tune_shard(settings=tuning, shard_id=shard_id, worker_id="w2")
    assert second.status == ShardRun.DONE and second.written == 8 - 3
    resumed = _final_valid_loss(tuning, job_id)
    assert resumed == pytest.approx(_final_valid_loss(tuning, straight_id), rel=0.05)
    with session_scope(tuning.database_url) as session:
        events, _ = list_events(session=session, job_id=job_id, after=None, limit=100)
    assert any(e.message.startswith("Resumed from step 3 of 8 (attempt 2)") for e in events)


def test_cancel_stops_training_within_a_segment(tuning, tenant_id, monkeypatch) -> None:
    job_id, shard_id = _create(tuning, tenant_id, epochs=20)
    real = job_runner._save_segment

    def cancel_after_the_first(settings, *args, **kwargs):
        real(settings, *args, **kwargs)
        with session_scope(settings.database_url) as session:
            cancel(session=session, tenant_id=tenant_id, job_id=job_id)

    monkeypatch.setattr(job_runner, "_save_segment", cancel_after_the_first)
    outcome = run_fine_tune_shard(settings=tuning, shard_id=shard_id, worker_id="w1")
    job = _job(tuning, job_id)
    assert outcome.status == ShardRun.CANCELLED and job.status == FineTuneStatus.CANCELLED
    assert job.step < 10 and job.fine_tuned_model is None
