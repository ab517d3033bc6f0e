"""The Celery tasks: thin wrappers that take ids, call a plain function, and record the outcome.

A worker is one process per GPU whose pool threads each hold a shard, all feeding that process's
engine (workers.runtime.engine_loop). Models load before the pool starts (`preload_models`, threads
pool) or in the pool child (prefork: CUDA does not survive fork), or lazily at the first shard.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_process_init
from sqlalchemy import select

from db.models import Job, JobKind, Shard
from db.session import get_engine, session_scope
from genq.settings import Settings, get_settings
from workers.batches.shard_runner import default_model_loader, run_shard
from workers.celery_app import REAP_TASK, RUN_SHARD_TASK, app
from workers.dispatch import enqueue_shards
from workers.reaper import reap
from workers.registry import is_image_model
from workers.shard_outcome import ShardOutcome, ShardRun

log = logging.getLogger(__name__)

# Model ids to load when a pool child starts; `genq worker --models` fills it before the pool forks.
PRELOAD_MODELS: list[str] = []


def worker_id() -> str:
    """This process as a lease owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def preload_models() -> None:
    """Loads PRELOAD_MODELS into this process (cached by the loader); image architectures have nothing
    to load until a job names a trained model."""
    for model_id in PRELOAD_MODELS:
        if is_image_model(model_id):
            continue
        log.info("loading %s in %s", model_id, worker_id())
        default_model_loader(model_id)


@worker_process_init.connect
def _init_child(**_: object) -> None:
    # Connections inherited from the parent must not be shared with it after fork.
    get_engine(get_settings().resolved_database_url()).dispose(close=False)
    preload_models()


def job_kind(settings: Settings, shard_id: int) -> JobKind | None:
    """The kind of the job the shard belongs to (None: the shard is gone, its job deleted)."""
    with session_scope(settings.resolved_database_url()) as session:
        return session.scalar(select(Job.kind).join(Shard, Shard.job_id == Job.id).where(Shard.id == shard_id))


def run_any_shard(settings: Settings, shard_id: int, worker: str) -> ShardOutcome:
    """Runs the shard with its job kind's executor."""
    kind = job_kind(settings, shard_id)
    if kind == JobKind.FINE_TUNE:
        from workers.fine_tuning.job_runner import run_fine_tune_shard  # torch: only when a fine-tune arrives

        return run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id=worker)
    if kind == JobKind.BATCH:
        return run_shard(settings=settings, shard_id=shard_id, worker_id=worker)
    return ShardOutcome(shard_id=shard_id, status=ShardRun.NOT_CLAIMED)


@app.task(name=RUN_SHARD_TASK, ignore_result=True)
def run_shard_task(shard_id: int) -> str:
    """Runs shard shard_id; a crashed attempt with attempts left is sent again right away."""
    settings = get_settings()
    outcome = run_any_shard(settings, int(shard_id), worker_id())
    log.info("shard %s: %s (attempt %s, %s written, %s skipped)", shard_id, outcome.status, outcome.attempt,
             outcome.written, outcome.skipped)
    if outcome.status == ShardRun.RELEASED and outcome.queue:
        enqueue_shards(settings, [(int(shard_id), outcome.queue)])
    return outcome.status


@app.task(name=REAP_TASK, ignore_result=True)
def reap_task() -> None:
    """One reaper pass (beat sends this every reaper_interval_seconds)."""
    report = reap(get_settings())
    log.info("reaper: %s", report)
