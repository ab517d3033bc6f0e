"""run_image_training: an image fine-tune (model "gan" or "vae") from its dataset file to a servable model.

Called by workers/fine_tuning/job_runner.py inside its claim, heartbeat and release, so statuses,
cancel, leases and resumption are the language-model fine-tune's; here a step is an epoch:

    validating_files   read the dataset (workers/images/data.py: every problem names its member; a
                       bad dataset fails the job), resize, dedupe, split off validation data
    running            per epoch: train (stops within one batch of a cancel), then in one transaction
                       fenced by the attempt: the resumable state's key, a metrics event whose data
                       links the epoch's sample grid (a fine-tune-results PNG file), and (before the
                       last epoch) a servable checkpoint, the newest 3 kept
    succeeded          the model's files (workers/images/artifact.py), the metrics CSV, the model row
                       ft:ARCH:TENANT:SUFFIX:ID with its card

A later attempt (after a killed worker) reads the same file with the same seed, so it prepares the
same split, loads the last epoch's state and continues with the same batches and noise.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from contextlib import suppress
from typing import Any

from sqlalchemy import select

from db.files import FINE_TUNE_RESULTS_PURPOSE, create_file, file_storage_key, new_file_id
from db.fine_tuning import (
    add_event,
    add_model,
    prune_checkpoints,
    record_segment,
    start_preparing,
    start_running,
)
from db.models import FineTuningEvent
from db.session import session_scope
from genq.settings import Settings
from storage import Store, store_from_settings
from storage.keys import adapter_prefix, training_state_key
from workers.fine_tuning.data import TrainingFileError, TrainingFileErrorCode
from workers.fine_tuning.job_runner import (
    KEPT_CHECKPOINTS,
    Cancelled,
    FineTuneJob,
    LeaseLost,
    delete_pruned,
    metrics_events,
    publish,
    stop_if_told,
)
from workers.heartbeat import Heartbeat, while_storage_is_down
from workers.images.artifact import ImageModelCard, model_files
from workers.images.data import ImageDataError, ImageDataset, read_dataset, split
from workers.images.hyperparameters import (
    BASE_CHANNELS,
    ImageHyperparameters,
    ResolvedImageHyperparameters,
    resolve_image_hyperparameters,
)
from workers.images.train import GanTrainer, Stopped, TrainConfig, VaeTrainer
from workers.runtime.loader import resolve_device

log = logging.getLogger(__name__)
VALIDATION_FRACTION = 0.1  # held out per class when no validation file is given (at least 1 image)
METRIC_NAMES = {
    "gan": ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "d_acc_valid_real"),
    "vae": ("train_loss", "valid_recon_mse", "pca_recon_mse", "valid_kl", "valid_elbo", "beta"),
}


def run_image_training(settings: Settings, job: FineTuneJob, heartbeat: Heartbeat) -> int:
    """Prepares, trains epoch by epoch and publishes; returns the epochs this attempt trained."""
    url = settings.resolved_database_url()
    store = store_from_settings(settings)
    architecture = job.method["type"]
    with session_scope(url) as session:
        if not start_preparing(session=session, job_id=job.id):
            raise Cancelled

    def patient(operation):  # storage calls wait out an outage (keeping the lease) instead of crashing
        return while_storage_is_down(operation, heartbeat, settings.storage_outage_seconds)

    requested = ImageHyperparameters(**job.method[architecture]["hyperparameters"])
    train, valid, source = _prepare(patient, store, job, requested)
    resolved = resolve_image_hyperparameters(requested, architecture, n_images=len(train), image_size=train.image_size)
    trainer_class = GanTrainer if architecture == "gan" else VaeTrainer
    trainer = trainer_class(train, valid, _train_config(resolved, job.seed, str(resolve_device(settings))))
    card = ImageModelCard(architecture=architecture, image_size=train.image_size, channels=train.channels,
                          latent_dim=resolved.latent_dim, class_names=list(train.class_names),
                          base_channels=BASE_CHANNELS)
    with session_scope(url) as session:
        if job.resume_key is None and not _prepared_before(session, job.id):  # once, whoever prepares again
            _report_preparation(session, job.id, train, valid, source)
        if not start_running(session=session, shard_id=job.shard_id, attempt=job.attempt, job_id=job.id,
                             hyperparameters=resolved.as_dict(), total_steps=resolved.n_epochs):
            raise LeaseLost if heartbeat.lease_lost.is_set() else Cancelled
    if job.resume_key:
        trainer.load_state_bytes(patient(lambda: store.get_bytes(job.resume_key)))
        with session_scope(url) as session:
            add_event(session=session, job_id=job.id, message=f"Resumed from epoch {trainer.epoch} of "
                                                               f"{resolved.n_epochs} (attempt {job.attempt})")
    started_at = trainer.epoch
    while not trainer.finished:
        began = time.monotonic()
        try:
            metrics = trainer.run_epoch(should_stop=heartbeat.should_stop)
        except Stopped:
            stop_if_told(heartbeat)
            raise Cancelled from None
        stop_if_told(heartbeat)
        _save_epoch(settings, store, job, trainer, card, metrics, patient, seconds=time.monotonic() - began)
    _publish(settings, store, job, trainer, card, patient)
    return trainer.epoch - started_at


def _prepare(patient: Any, store: Store, job: FineTuneJob, requested: ImageHyperparameters
             ) -> tuple[ImageDataset, ImageDataset, str]:
    """(train, valid, where valid came from); TrainingFileError naming the member for a bad dataset."""
    size = None if requested.image_size == "auto" else int(requested.image_size)
    try:
        dataset, _ = read_dataset(patient(lambda: store.get_bytes(job.training_key)), size)
    except ImageDataError as exc:
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE, f"training file: {exc}") from None
    if job.validation_key is None:
        train, valid = split(dataset, VALIDATION_FRACTION, seed=job.seed)
        return train, valid, "split"
    try:
        valid, _ = read_dataset(patient(lambda: store.get_bytes(job.validation_key)), dataset.image_size)
    except ImageDataError as exc:
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE, f"validation file: {exc}") from None
    if valid.class_names != dataset.class_names or valid.channels != dataset.channels:
        raise TrainingFileError(TrainingFileErrorCode.FORMAT_MISMATCH,
                                f"the validation file's classes {valid.class_names} and {valid.channels} channel(s) "
                                f"must be the training file's {dataset.class_names} and {dataset.channels}")
    return dataset, valid, "file"


def _train_config(resolved: ResolvedImageHyperparameters, seed: int, device: str) -> TrainConfig:
    return TrainConfig(n_epochs=resolved.n_epochs, batch_size=resolved.batch_size,
                       learning_rate=resolved.learning_rate, image_size=resolved.image_size,
                       latent_dim=resolved.latent_dim, beta=resolved.beta or 1.0,
                       warmup_epochs=resolved.warmup_epochs, seed=seed, base_channels=BASE_CHANNELS, device=device)


def _prepared_before(session: Any, job_id: str) -> bool:
    return session.scalar(select(FineTuningEvent.id).where(
        FineTuningEvent.job_id == job_id, FineTuningEvent.message.startswith("Prepared ")).limit(1)) is not None


def _report_preparation(session: Any, job_id: str, train: ImageDataset, valid: ImageDataset, source: str) -> None:
    stats = {"train_images": len(train), "validation_images": len(valid), "validation_source": source,
             "classes": list(train.class_names), "image_size": train.image_size, "channels": train.channels,
             "duplicates_dropped": train.duplicates_dropped}
    classes = f"{len(train.class_names)} classes" if train.class_names else "no labels (unconditional)"
    add_event(session=session, job_id=job_id, data=stats, message=(
        f"Prepared {len(train)} training and {len(valid)} validation images "
        f"({'from its file' if source == 'file' else 'split off the training file'}), {classes}, "
        f"{train.image_size}x{train.image_size}x{train.channels}; {train.duplicates_dropped} duplicates dropped"))


def _metrics_message(architecture: str, m: dict[str, Any]) -> str:
    head = f"Epoch {m['step']}/{m['total_steps']}: "
    if architecture == "gan":
        return head + (f"D loss={m['d_loss']:.4f}, G loss={m['g_loss']:.4f}, D accuracy real={m['d_acc_real']:.3f} "
                       f"fake={m['d_acc_fake']:.3f}")
    return head + (f"validation ELBO={m['valid_elbo']:.2f} nats (KL {m['valid_kl']:.2f}), reconstruction MSE="
                   f"{m['valid_recon_mse']:.4f} (PCA {m['pca_recon_mse']:.4f})")


def _save_epoch(settings: Settings, store: Store, job: FineTuneJob, trainer: GanTrainer | VaeTrainer,
                card: ImageModelCard, metrics: dict[str, float], patient: Any, *, seconds: float) -> None:
    """The epoch's state, grid and (before the last epoch) checkpoint files, then in one transaction fenced
    by the attempt: the job's resume point, the grid's file row, the metrics event and the checkpoint."""
    epoch, total = trainer.epoch, trainer.config.n_epochs
    state_key = training_state_key(job.id, epoch)
    state = trainer.state_bytes()
    patient(lambda: store.put_bytes(state_key, state))
    grid_id = new_file_id()
    grid = trainer.grid_png()
    patient(lambda: store.put_bytes(file_storage_key(grid_id), grid))
    checkpoint = adapter_prefix(job.id, epoch) if epoch < total else None  # the last epoch is the model itself
    if checkpoint is not None:
        _put_model(store, checkpoint, trainer, card, patient)
    data = {"step": epoch, "total_steps": total, **{k: metrics[k] for k in METRIC_NAMES[card.architecture]},
            "sample_grid_file": grid_id}
    eta = int(time.time() + seconds * (total - epoch)) if epoch < total else None
    with session_scope(settings.resolved_database_url()) as session:
        if not record_segment(session=session, shard_id=job.shard_id, attempt=job.attempt, job_id=job.id,
                              step=epoch, resume_key=state_key, trained_tokens=epoch * len(trainer.train),
                              estimated_finish=eta):
            raise LeaseLost
        create_file(session=session, tenant_id=job.tenant_id, file_id=grid_id,
                    filename=f"epoch-{epoch:03d}-samples.png", purpose=FINE_TUNE_RESULTS_PURPOSE, size=len(grid))
        add_event(session=session, job_id=job.id, type="metrics", data=data,
                  message=_metrics_message(card.architecture, data))
        pruned = []
        if checkpoint is not None:
            add_model(session=session, model_id=f"{job.model_name}:ckpt-step-{epoch}", tenant_id=job.tenant_id,
                      job_id=job.id, base_model=job.model, adapter_key=checkpoint, checkpoint_step=epoch,
                      metrics={k: v for k, v in data.items() if k != "sample_grid_file"}, image_spec=card.as_dict())
            add_event(session=session, job_id=job.id, message=f"Checkpoint created at epoch {epoch}")
            pruned = prune_checkpoints(session=session, job_id=job.id, keep=KEPT_CHECKPOINTS)
    delete_pruned(store, pruned)
    if job.resume_key and job.resume_key != state_key:
        with suppress(Exception):
            store.delete(job.resume_key)  # only the newest state is needed
    job.resume_key = state_key


def _put_model(store: Store, prefix: str, trainer: GanTrainer | VaeTrainer, card: ImageModelCard,
               patient: Any) -> None:
    for name, data in model_files(card, trainer.sampler).items():
        patient(lambda name=name, data=data: store.put_bytes(f"{prefix}{name}", data))


def results_csv(architecture: str, metrics: list[dict[str, Any]]) -> bytes:
    """One row per epoch: step (the epoch), the model's metrics, the epoch's sample-grid file id."""
    columns = ("step", *METRIC_NAMES[architecture], "sample_grid_file")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for m in metrics:
        writer.writerow([m.get(column, "") for column in columns])
    return out.getvalue().encode()


def _publish(settings: Settings, store: Store, job: FineTuneJob, trainer: GanTrainer | VaeTrainer,
             card: ImageModelCard, patient: Any) -> None:
    prefix = adapter_prefix(job.id)
    _put_model(store, prefix, trainer, card, patient)
    last = trainer.history[-1] if trainer.history else {}
    final = {k: last[k] for k in METRIC_NAMES[card.architecture] if k in last}
    publish(settings, store, job, patient, model_prefix=prefix,
            results=results_csv(card.architecture, metrics_events(settings, job.id)), results_name="epoch_metrics.csv",
            trained_tokens=trainer.epoch * len(trainer.train), image_spec=card.as_dict(),
            model_metrics={"epochs": trainer.epoch, **final})
