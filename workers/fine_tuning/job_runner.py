"""run_fine_tune_shard: claim a fine-tune's shard, prepare its data, train it in segments, publish the model.

The executor of the fine_tune job kind, on the same lease machinery as batches (claim, heartbeat,
fenced writes, reaper). Each segment (settings.fine_tune_segment_seconds) ends with the trainer's
whole state in storage and the job row pointing at it, in a transaction fenced by the attempt; a
later attempt (another worker, after this one died) prepares the same data from the same files and
seed and continues from that state, with the same data order and optimizer moments. Cancel is seen by
the heartbeat and stops training before its next step. Epoch ends write a checkpoint (the last 3
kept), each servable as a model; the end writes the final adapter, the metrics CSV and the model row.
Image models (method type "gan" or "vae") train in workers/images/job.py on the same claim, lease,
heartbeat and release, with an epoch as their step.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select

from db.files import FINE_TUNE_RESULTS_PURPOSE, create_file, file_storage_key, new_file_id
from db.fine_tuning import (
    ACTIVE_STATUSES,
    add_event,
    add_model,
    fail,
    fail_orphaned,
    fine_tuned_model_name,
    job_runs,
    prune_checkpoints,
    record_segment,
    start_preparing,
    start_running,
    status_of,
    succeed,
)
from db.leases import claim_shard, finish_shard, release_shard
from db.models import File, FineTuningEvent, FineTuningJob, Shard, ShardStatus, Tenant
from db.session import session_scope
from genq.settings import Settings
from storage import Store, store_from_settings
from storage.keys import adapter_prefix, training_state_key
from workers.fine_tuning.data import Method, TrainingFile, TrainingFileError, read_training_file
from workers.fine_tuning.hyperparameters import Hyperparameters, resolve_hyperparameters
from workers.fine_tuning.lora import LoraConfig, adapter_files
from workers.fine_tuning.prepare import PreparedData, prepare
from workers.fine_tuning.trainer import SegmentResult, Trainer, TrainerConfig
from workers.heartbeat import Heartbeat, while_storage_is_down
from workers.registry import IMAGE_ARCHITECTURES, ModelSpec, get_model
from workers.runtime.loader import read_checkpoint, resolve_device, resolve_source
from workers.runtime.model import Transformer, build_model
from workers.runtime.weights import fuse_projections
from workers.shard_outcome import ShardOutcome, ShardRun

log = logging.getLogger(__name__)
KEPT_CHECKPOINTS = 3
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
Patient = Callable[[Callable[[], Any]], Any]  # runs a storage call, waiting out an outage


class LeaseLost(RuntimeError):
    """Another attempt owns the shard now: this one stops and writes nothing more."""


class Cancelled(RuntimeError):
    """The job was cancelled (or otherwise ended) while this attempt ran."""


@dataclass
class FineTuneJob:
    shard_id: int
    attempt: int
    queue: str
    id: str
    tenant_id: str
    tenant_name: str
    model: str
    training_key: str
    validation_key: str | None
    method: dict[str, Any]
    suffix: str | None
    seed: int
    resume_key: str | None

    @property
    def kind(self) -> Method:
        """A language model's method (supervised, dpo); image jobs have "gan" or "vae" in method["type"]."""
        return Method(self.method["type"])

    @property
    def model_name(self) -> str:
        return fine_tuned_model_name(base=self.model, tenant_name=self.tenant_name, suffix=self.suffix, job_id=self.id)


def run_fine_tune_shard(*, settings: Settings, shard_id: int, worker_id: str) -> ShardOutcome:
    """Runs (or resumes) the fine-tune whose shard this is; see the module docstring."""
    url = settings.resolved_database_url()
    job = _claim(settings, shard_id, worker_id)
    if job is None:
        return ShardOutcome(shard_id=shard_id, status=ShardRun.NOT_CLAIMED)
    heartbeat = Heartbeat(database_url=url, shard_id=shard_id, attempt=job.attempt,
                          job_stopped=lambda session: status_of(session=session, job_id=job.id) not in ACTIVE_STATUSES,
                          lease_seconds=settings.lease_seconds, interval=settings.heartbeat_seconds,
                          time_limit=settings.fine_tune_time_limit_seconds)
    heartbeat.start()
    try:
        steps = _run(settings, job, heartbeat)
    except TrainingFileError as exc:  # the files pass the API's checks but not tokenization: nothing to retry
        with session_scope(url) as session:
            if finish_shard(session=session, shard_id=shard_id, attempt=job.attempt, status=ShardStatus.FAILED,
                            error=exc.message):
                fail(session=session, job_id=job.id, code=exc.code.value, message=exc.message)
        return ShardOutcome(shard_id=shard_id, status=ShardRun.FAILED, attempt=job.attempt, error=exc.message)
    except LeaseLost:
        return ShardOutcome(shard_id=shard_id, status=ShardRun.LEASE_LOST, attempt=job.attempt)
    except Cancelled:
        with session_scope(url) as session:
            finish_shard(session=session, shard_id=shard_id, attempt=job.attempt, status=ShardStatus.CANCELLED)
        return ShardOutcome(shard_id=shard_id, status=ShardRun.CANCELLED, attempt=job.attempt)
    except Exception as exc:  # a crash (out of memory, storage down): another attempt resumes from the last segment
        log.exception("fine-tune %s attempt %s crashed", job.id, job.attempt)
        return _release(settings, job, f"{type(exc).__name__}: {exc}")
    finally:
        heartbeat.close()
    return ShardOutcome(shard_id=shard_id, status=ShardRun.DONE, attempt=job.attempt, written=steps)


def _claim(settings: Settings, shard_id: int, worker_id: str) -> FineTuneJob | None:
    with session_scope(settings.resolved_database_url()) as session:
        attempt = claim_shard(session=session, shard_id=shard_id, worker_id=worker_id,
                              lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
                              job_runs=job_runs())
        row = session.execute(
            select(Shard.queue, FineTuningJob, Tenant.name).join(FineTuningJob, FineTuningJob.id == Shard.job_id)
            .join(Tenant, Tenant.id == FineTuningJob.tenant_id).where(Shard.id == shard_id)).first()
        if row is None:
            return None
        queue, ft, tenant_name = row
        if attempt is None:  # out of attempts (claim_shard failed the shard): the job fails with its reason
            fail_orphaned(session=session, job_ids=[ft.id])
            return None
        keys = dict(session.execute(select(File.id, File.storage_key).where(
            File.id.in_([ft.training_file, ft.validation_file or ""]))).all())
        if ft.training_file not in keys or (ft.validation_file and ft.validation_file not in keys):
            fail(session=session, job_id=ft.id, code="file_deleted",
                 message="The training or validation file was deleted before training started")
            finish_shard(session=session, shard_id=shard_id, attempt=attempt, status=ShardStatus.FAILED)
            return None
        return FineTuneJob(shard_id=shard_id, attempt=attempt, queue=queue, id=ft.id, tenant_id=ft.tenant_id,
                    tenant_name=tenant_name, model=ft.model, training_key=keys[ft.training_file],
                    validation_key=keys.get(ft.validation_file) if ft.validation_file else None, method=ft.method,
                    suffix=ft.suffix, seed=ft.seed, resume_key=ft.resume_key)


def _release(settings: Settings, job: FineTuneJob, error: str) -> ShardOutcome:
    with session_scope(settings.resolved_database_url()) as session:
        status = release_shard(session=session, shard_id=job.shard_id, attempt=job.attempt, error=error,
                               max_attempts=settings.max_attempts)
        if status == ShardStatus.FAILED:
            fail_orphaned(session=session, job_ids=[job.id])
    if status == ShardStatus.QUEUED:
        return ShardOutcome(shard_id=job.shard_id, status=ShardRun.RELEASED, attempt=job.attempt, queue=job.queue,
                            error=error)
    if status is None:
        return ShardOutcome(shard_id=job.shard_id, status=ShardRun.LEASE_LOST, attempt=job.attempt)
    return ShardOutcome(shard_id=job.shard_id, status=ShardRun.FAILED, attempt=job.attempt, error=error)


def _read(store: Store, key: str, method: Method, min_examples: int = 10) -> TrainingFile:
    return read_training_file(store.get_bytes(key).splitlines(), method, min_examples=min_examples)


def training_model(settings: Settings, base_model: str) -> tuple[Transformer, Any, ModelSpec]:
    """The base model in fp32 on the worker's device for training, its checkpoint (tokenizer, template)
    and its registry entry."""
    spec = get_model(base_model, settings)
    checkpoint = read_checkpoint(resolve_source(spec.source, settings))
    model = build_model(checkpoint.config, fuse_projections(checkpoint.tensors, checkpoint.config),
                        resolve_device(settings), torch.float32)
    return model, checkpoint, spec


def lora_config(method: dict[str, Any]) -> LoraConfig:
    lora = method.get("lora") or {}
    return LoraConfig(rank=lora.get("rank", 8), alpha=lora.get("alpha", 16.0), dropout=lora.get("dropout", 0.0),
                      target_modules=tuple(lora.get("target_modules", LoraConfig().target_modules)))


def _run(settings: Settings, job: FineTuneJob, heartbeat: Heartbeat) -> int:
    """Prepares, trains and publishes with the job's kind of model; returns the steps this attempt trained."""
    if job.method["type"] in IMAGE_ARCHITECTURES:
        from workers.images.job import run_image_training

        return run_image_training(settings, job, heartbeat)
    return _run_language_model(settings, job, heartbeat)


def _run_language_model(settings: Settings, job: FineTuneJob, heartbeat: Heartbeat) -> int:
    """Prepares, trains segment by segment and publishes a LoRA adapter; returns the steps trained."""
    url = settings.resolved_database_url()
    store = store_from_settings(settings)
    first = job.resume_key is None
    with session_scope(url) as session:
        if not start_preparing(session=session, job_id=job.id):
            raise Cancelled
    model, checkpoint, spec = training_model(settings, job.model)

    def patient(operation):  # storage calls wait out an outage (keeping the lease) instead of crashing
        return while_storage_is_down(operation, heartbeat, settings.storage_outage_seconds)

    train = patient(lambda: _read(store, job.training_key, job.kind))
    validation = (patient(lambda: _read(store, job.validation_key, job.kind, min_examples=1))
                  if job.validation_key else None)
    data = prepare(train, checkpoint.tokenizer, checkpoint.chat_template, validation=validation,
                   max_length=min(spec.context_length, settings.fine_tune_max_length), seed=job.seed)
    requested = dict(job.method[job.kind.value]["hyperparameters"])
    chosen_nll_weight = float(requested.pop("chosen_nll_weight", 0.0))  # genq's DPO extension (RPO)
    requested = Hyperparameters(**requested)
    resolved = resolve_hyperparameters(requested, len(data.train), job.kind)
    config = TrainerConfig(method=job.kind, hyperparameters=resolved, lora=lora_config(job.method), seed=job.seed,
                           chosen_nll_weight=chosen_nll_weight if job.kind is Method.DPO else 0.0,
                           early_stopping_patience=settings.fine_tune_early_stopping_patience,
                           row_tokens=4096)  # the trainer widens it for a longer example
    trainer = Trainer(model, data, config)
    before = trainer.evaluate() if first else {}  # step 0 of the validation curve: what training improves on
    with session_scope(url) as session:
        if first:
            _report_preparation(session, job.id, data)
            if before:
                start = {"step": 0, "total_steps": trainer.total_steps} | before | {
                    f"full_{k}": v for k, v in before.items()}
                add_event(session=session, job_id=job.id, type="metrics", data=start, message=_metrics_message(start))
        if not start_running(session=session, shard_id=job.shard_id, attempt=job.attempt, job_id=job.id,
                             hyperparameters=resolved.as_dict(), total_steps=trainer.total_steps):
            raise LeaseLost if heartbeat.lease_lost.is_set() else Cancelled
    if job.resume_key:
        trainer.load_state_bytes(patient(lambda: store.get_bytes(job.resume_key)))
        with session_scope(url) as session:
            add_event(session=session, job_id=job.id, message=f"Resumed from step {trainer.step} of "
                                                               f"{trainer.total_steps} (attempt {job.attempt})")
    started_at = trainer.step
    while True:
        began, step_before = time.monotonic(), trainer.step
        result = trainer.run_segment(max_seconds=settings.fine_tune_segment_seconds, should_stop=heartbeat.should_stop)
        stop_if_told(heartbeat)
        _save_segment(settings, store, job, trainer, result, patient, seconds=time.monotonic() - began,
                      steps=result.step - step_before)
        if result.finished:
            break
    _publish(settings, store, job, trainer, patient)
    return trainer.step - started_at


def stop_if_told(heartbeat: Heartbeat) -> None:
    if heartbeat.lease_lost.is_set():
        raise LeaseLost
    if heartbeat.stop_requested.is_set():
        raise Cancelled
    if heartbeat.timed_out.is_set():
        raise TimeoutError("the attempt ran past fine_tune_time_limit_seconds")


def _report_preparation(session: Any, job_id: str, data: PreparedData) -> None:
    s = data.stats
    add_event(session=session, job_id=job_id, data=s, message=(
        f"Prepared {s['train_examples']} training and {s['validation_examples']} validation examples "
        f"(validation {'from its file' if s['validation_source'] == 'file' else 'split off the training file'}); "
        f"{s['duplicates_dropped']} duplicates and {s['empty_turns_dropped']} empty turns dropped, "
        f"{s['truncated']} truncated to {s['max_length']} tokens; {s['train_tokens']} tokens per epoch, "
        f"{s['mean_tokens']} per example on average, {s['max_tokens']} at most"))


def _metrics_message(m: dict[str, Any]) -> str:
    parts = [f"training loss={m['train_loss']:.4f}"] if "train_loss" in m else []
    if "valid_loss" in m:
        parts.append(f"validation loss={m['valid_loss']:.4f}")
    return f"Step {m['step']}/{m['total_steps']}: " + ", ".join(parts)


def _save_segment(settings: Settings, store: Store, job: FineTuneJob, trainer: Trainer, result: SegmentResult,
                  patient: Patient, *, seconds: float, steps: int) -> None:
    """Metrics events, the resumable state (fenced), and the epoch's checkpoint when one ended."""
    url = settings.resolved_database_url()
    key = training_state_key(job.id, trainer.step)
    state = trainer.state_bytes()
    patient(lambda: store.put_bytes(key, state))
    per_step = seconds / max(1, steps)
    eta = int(time.time() + per_step * (trainer.total_steps - trainer.step)) if not result.finished else None
    with session_scope(url) as session:
        if not record_segment(session=session, shard_id=job.shard_id, attempt=job.attempt, job_id=job.id,
                              step=trainer.step, resume_key=key, trained_tokens=trainer.trained_tokens,
                              estimated_finish=eta):
            raise LeaseLost
        for m in result.metrics:
            add_event(session=session, job_id=job.id, type="metrics", data=m, message=_metrics_message(m))
    if job.resume_key and job.resume_key != key:
        with suppress(Exception):
            store.delete(job.resume_key)  # only the newest state is needed
    job.resume_key = key
    if result.epoch_completed is not None and not result.finished:
        _checkpoint(settings, store, job, trainer, result, patient)


def _put_adapter(store: Store, prefix: str, trainer: Trainer, base: str, patient: Patient) -> None:
    for name, data in adapter_files(trainer.adapters, base).items():
        patient(lambda name=name, data=data: store.put_bytes(f"{prefix}{name}", data))


def _checkpoint(settings: Settings, store: Store, job: FineTuneJob, trainer: Trainer, result: SegmentResult,
                patient: Patient) -> None:
    prefix = adapter_prefix(job.id, trainer.step)
    _put_adapter(store, prefix, trainer, job.model, patient)
    last = result.metrics[-1] if result.metrics else {}
    with session_scope(settings.resolved_database_url()) as session:
        add_model(session=session, model_id=f"{job.model_name}:ckpt-step-{trainer.step}", tenant_id=job.tenant_id,
                  job_id=job.id, base_model=job.model, adapter_key=prefix, checkpoint_step=trainer.step,
                  metrics={k: v for k, v in last.items() if k in ("step", "train_loss", "valid_loss",
                                                                   "full_valid_loss", "train_mean_token_accuracy",
                                                                   "valid_mean_token_accuracy")})
        add_event(session=session, job_id=job.id, message=f"Checkpoint created at step {trainer.step} "
                                                           f"(epoch {result.epoch_completed})")
        pruned = prune_checkpoints(session=session, job_id=job.id, keep=KEPT_CHECKPOINTS)
    delete_pruned(store, pruned)


def delete_pruned(store: Store, prefixes: list[str]) -> None:
    """Removes the files of pruned checkpoints (their rows are gone already)."""
    for old in prefixes:
        for key in list(store.list_keys(old)):
            with suppress(Exception):
                store.delete(key)


def results_csv(metrics: list[dict[str, Any]]) -> bytes:
    """OpenAI's step metrics file: step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(RESULT_COLUMNS)
    for m in metrics:
        accuracy = m.get("train_mean_token_accuracy", m.get("train_reward_accuracy"))
        valid_accuracy = m.get("valid_mean_token_accuracy", m.get("valid_reward_accuracy"))
        writer.writerow([m["step"], m.get("train_loss", ""), "" if accuracy is None else accuracy,
                         m.get("valid_loss", ""), "" if valid_accuracy is None else valid_accuracy])
    return out.getvalue().encode()


def _publish(settings: Settings, store: Store, job: FineTuneJob, trainer: Trainer, patient: Patient) -> None:
    """The final adapter, the metrics CSV (a fine-tune-results file), the model row, succeeded."""
    prefix = adapter_prefix(job.id)
    _put_adapter(store, prefix, trainer, job.model, patient)
    publish(settings, store, job, patient, model_prefix=prefix, results=results_csv(metrics_events(settings, job.id)),
            results_name="step_metrics.csv", trained_tokens=trainer.trained_tokens,
            model_metrics={"trained_tokens": trainer.trained_tokens, "steps": trainer.step})


def metrics_events(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's metrics events, oldest first."""
    with session_scope(settings.resolved_database_url()) as session:
        events = session.scalars(select(FineTuningEvent).where(
            FineTuningEvent.job_id == job_id, FineTuningEvent.type == "metrics").order_by(FineTuningEvent.id))
        return [e.data for e in events if e.data]


def publish(settings: Settings, store: Store, job: FineTuneJob, patient: Patient, *, model_prefix: str,
            results: bytes, results_name: str, trained_tokens: int, model_metrics: dict[str, Any],
            image_spec: dict[str, Any] | None = None) -> None:
    """The model's files are under model_prefix: store the results file, then in one fenced transaction
    the job succeeded, its model row, the shard done, the last event."""
    file_id = new_file_id()
    patient(lambda: store.put_bytes(file_storage_key(file_id), results))
    with session_scope(settings.resolved_database_url()) as session:
        create_file(session=session, tenant_id=job.tenant_id, file_id=file_id, filename=results_name,
                    purpose=FINE_TUNE_RESULTS_PURPOSE, size=len(results))
        if not succeed(session=session, shard_id=job.shard_id, attempt=job.attempt, job_id=job.id,
                       fine_tuned_model=job.model_name, trained_tokens=trained_tokens, result_files=[file_id]):
            session.rollback()
            raise LeaseLost if status_of(session=session, job_id=job.id) in ACTIVE_STATUSES else Cancelled
        add_model(session=session, model_id=job.model_name, tenant_id=job.tenant_id, job_id=job.id,
                  base_model=job.model, adapter_key=model_prefix, checkpoint_step=None, metrics=model_metrics,
                  image_spec=image_spec)
        finish_shard(session=session, shard_id=job.shard_id, attempt=job.attempt, status=ShardStatus.DONE)
        add_event(session=session, job_id=job.id, message=f"The job has successfully completed: {job.model_name}")
