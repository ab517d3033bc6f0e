"""Fine-tunes under faults, on real processes: `genq api`, `genq worker` (Celery on Redis), PostgreSQL,
SeaweedFS. A worker killed mid-training (SIGKILL to its whole process group) loses at most one
segment: the lease expires, the reaper re-sends the shard, another worker resumes from the last
stored state and the job ends where an uninterrupted run with the same seed ends; an image model (a
GAN on digits) resumes from its last epoch with the same metrics epoch for epoch. A cancel stops a
running job within a segment."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from db.models import FineTuningJob, Shard, ShardStatus
from db.session import session_scope
from tests.e2e.conftest import TINY
from tests.fault.harness import Deployment, wait_for
from tests.workers.images.conftest import digits_npz

pytestmark = [pytest.mark.slow, pytest.mark.fault]
TRAINING_ENV = {"GENQ_FINE_TUNE_SEGMENT_SECONDS": "0.3", "GENQ_FINE_TUNE_MAX_LENGTH": "128"}
NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo"]


def _training_file(d: Deployment) -> str:
    lines = [{"messages": [{"role": "user", "content": f"Describe item {i} for {NAMES[i % 10]}."},
                           {"role": "assistant", "content": f"Item {i} suits {NAMES[i % 10]}. Made to last."}]}
             for i in range(40)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return d.client().files.create(file=("train.jsonl", content), purpose="fine-tune").id


def _create(d: Deployment, training_file: str, epochs: int):
    return d.client().fine_tuning.jobs.create(
        model=TINY, training_file=training_file, seed=5, method={"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": epochs, "batch_size": 2, "learning_rate_multiplier": 1.0}}})


def _row(d: Deployment, job_id: str) -> tuple[FineTuningJob, Shard]:
    with session_scope(d.database_url) as session:
        job = session.get(FineTuningJob, job_id)
        shard = session.scalars(select(Shard).where(Shard.job_id == job_id)).one()
        session.expunge_all()
        return job, shard


def _wait_final(d: Deployment, job_id: str, timeout: float = 300) -> str:
    client = d.client()
    return wait_for(lambda: (s := client.fine_tuning.jobs.retrieve(job_id).status) in
                    ("succeeded", "failed", "cancelled") and s, timeout, f"fine-tune {job_id} to end", 0.3,
                    d.log_tail)


def _final_valid_loss(d: Deployment, job_id: str) -> float:
    events = d.client().fine_tuning.jobs.list_events(job_id, limit=100).data
    return next(e.data["full_valid_loss"] for e in events if e.type == "metrics" and "full_valid_loss" in e.data)


def test_kill_9_worker_mid_training_resumes_from_the_last_segment(deploy) -> None:
    d = deploy(**TRAINING_ENV)
    d.start_worker("first")
    training = _training_file(d)
    job = _create(d, training, epochs=12)
    wait_for(lambda: _row(d, job.id)[0].step >= 20, 180, "training to pass step 20", 0.05, d.log_tail)
    d.kill_worker("first")
    killed_at, _ = _row(d, job.id)
    assert killed_at.step < killed_at.total_steps, "training ended before the kill; make it longer"
    d.start_worker("second")
    assert _wait_final(d, job.id) == "succeeded"
    done, shard = _row(d, job.id)
    assert shard.status == ShardStatus.DONE and shard.attempt == 2 and shard.lease_owner is None
    events = [e.message for e in d.client().fine_tuning.jobs.list_events(job.id, limit=100).data]
    resumed = [m for m in events if m.startswith("Resumed from step")]
    assert len(resumed) == 1 and int(resumed[0].split()[3]) >= killed_at.step
    # The same job without the kill, on the worker that is left: the same end, within 5%.
    straight = _create(d, training, epochs=12)
    assert _wait_final(d, straight.id) == "succeeded"
    assert _final_valid_loss(d, job.id) == pytest.approx(_final_valid_loss(d, straight.id), rel=0.05)
    model = d.client().fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    assert model in [m.id for m in d.client().models.list().data]


def test_cancel_stops_a_running_fine_tune_within_a_segment(deploy) -> None:
    d = deploy(**TRAINING_ENV)
    d.start_worker("only")
    job = _create(d, _training_file(d), epochs=50)
    wait_for(lambda: _row(d, job.id)[0].step >= 3, 180, "training to start", 0.05, d.log_tail)
    assert d.client().fine_tuning.jobs.cancel(job.id).status == "cancelled"
    # The worker sees it at its next heartbeat (0.5 s) and stops before its next step.
    wait_for(lambda: _row(d, job.id)[1].status == ShardStatus.CANCELLED, 15, "the shard to stop", 0.1, d.log_tail)
    ended, shard = _row(d, job.id)
    assert ended.step < ended.total_steps and shard.lease_owner is None and ended.fine_tuned_model is None


def test_kill_9_image_worker_mid_training_resumes_from_the_last_epoch(deploy) -> None:
    d = deploy()
    d.start_worker("first", "-Q", "genq.gan")
    client = d.client()
    dataset = client.files.create(file=("digits.npz", digits_npz()), purpose="fine-tune").id

    def create():
        return client.fine_tuning.jobs.create(model="gan", training_file=dataset, seed=3, method={
            "type": "gan", "gan": {"hyperparameters": {"n_epochs": 6}}})

    job = create()
    wait_for(lambda: _row(d, job.id)[0].step >= 2, 180, "training to pass epoch 2", 0.05, d.log_tail)
    d.kill_worker("first")
    killed_at, _ = _row(d, job.id)
    assert killed_at.step < killed_at.total_steps, "training ended before the kill; make it longer"
    d.start_worker("second", "-Q", "genq.gan")
    assert _wait_final(d, job.id) == "succeeded"
    _, shard = _row(d, job.id)
    assert shard.status == ShardStatus.DONE and shard.attempt == 2
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert len([e for e in events if e.message.startswith("Resumed from epoch")]) == 1
    # The same job without the kill: the same metrics, epoch for epoch (same batches, same noise).
    straight = create()
    assert _wait_final(d, straight.id) == "succeeded"

    def curve(job_id):
        metrics = [e.data for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data if e.type == "metrics"]
        return sorted((m["step"], round(m["d_loss"], 5), round(m["g_loss"], 5)) for m in metrics)

    assert curve(job.id) == curve(straight.id) and len(curve(job.id)) == 6
