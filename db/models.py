"""Tables. Times that OpenAI shows are integer Unix seconds; leases are float seconds."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as their string values (VARCHAR + CHECK), so SQLite and PostgreSQL agree and new
    # values need no ALTER TYPE.
    return Enum(cls, native_enum=False, values_callable=lambda e: [m.value for m in e], length=32)


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class ShardStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for a worker (or for the reaper to re-dispatch it)
    RUNNING = "running"  # leased by lease_owner until lease_expires_at
    DONE = "done"
    FAILED = "failed"  # attempts exhausted or a non-retryable error
    CANCELLED = "cancelled"


class JobKind(enum.StrEnum):
    """What a job computes; each kind has its own table, lifecycle (db/) and executor (workers/<kind>/)."""

    BATCH = "batch"  # chat/completions requests: table batches, shards of request lines
    FINE_TUNE = "fine_tune"  # LoRA SFT or DPO: table fine_tuning_jobs, one shard trained in segments


class RequestOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"  # its line goes to the output file
    FAILED = "failed"  # its line goes to the error file


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(1024))
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)


class Job(Base):
    """The parent of every job kind: what the shared lease, heartbeat and reaper machinery needs to know.

    Each kind specialises it in its own table with the same id (batches, fine_tuning_jobs) that holds its
    OpenAI-visible status; work units (shards) reference the job, never a kind's table.
    """

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_jobs_tenant_kind_created", "tenant_id", "kind", "created_at"),)


class Batch(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    input_file_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus))
    model: Mapped[str] = mapped_column(String(1024))  # the models named in the file, comma-separated
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    request_total: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))  # sha256 of the create body
    retried_from: Mapped[str | None] = mapped_column(String(64))  # batch whose failed lines this retries
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # OpenAI {"object": "list", "data": [...]}
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # set once by the finalizer
    # Finalizations that raised; at max_attempts the batch is failed with the error, never left finalizing.
    finalize_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency"),
        Index("ix_batches_tenant_created", "tenant_id", "created_at"),
        Index("ix_batches_status", "status"),
    )


class Shard(Base):
    """A job's unit of work: one Celery task, leased and fenced by `attempt`. For a batch, a slice of its
    lines for one model; for a fine-tune, the whole training run (resumed from its last checkpoint)."""

    __tablename__ = "shards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(256))
    queue: Mapped[str] = mapped_column(String(300))
    input_key: Mapped[str] = mapped_column(String(1024))  # storage key of the shard's JSONL requests
    request_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[ShardStatus] = mapped_column(_enum(ShardStatus))
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # the fencing token: +1 per claim
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # Its stored results, counted in the transaction that stores each one (db/leases.py), so a status
    # poll reads the batch's few shard rows instead of scanning its results.
    succeeded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Attempts whose worker died (lease expired) instead of finishing or releasing. After a death the
    # shard runs its requests one at a time, naming each in `suspect` first: when a request kills its
    # worker again, the next attempt quarantines that one request and finishes the others.
    deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The most tokens its requests may generate (max_tokens, or the default): the tenant's queued-token cap.
    requested_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    suspect: Mapped[str | None] = mapped_column(String(512))
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_shards_job_index"),
        Index("ix_shards_status_lease", "status", "lease_expires_at"),
    )


class RequestResult(Base):
    """One request's outcome; unique per (batch, custom_id), so a re-run writes nothing twice."""

    __tablename__ = "request_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), index=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    line_number: Mapped[int] = mapped_column(Integer)  # 1-based line in the input file
    outcome: Mapped[RequestOutcome] = mapped_column(_enum(RequestOutcome))
    output_line: Mapped[dict[str, Any]] = mapped_column(JSON)  # the OpenAI output or error line
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_results_batch_custom_id"),
        Index("ix_results_batch_outcome", "batch_id", "outcome"),
    )


class FineTuneStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"  # the worker checks and prepares the files before training
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FineTuningJob(Base):
    """A LoRA fine-tune (OpenAI's fine_tuning.job): the fine_tune kind of jobs, trained by one shard."""

    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))  # the base model
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": "supervised"|"dpo", <type>: {"hyperparameters"}}
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved ("auto" replaced) once prepared
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    status: Mapped[FineTuneStatus] = mapped_column(_enum(FineTuneStatus))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"code", "message", "param"}
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # optimizer steps done
    # The last segment's resumable training state in storage (adapter, optimizer, data position), written
    # under the shard's lease: a resumed attempt continues from it.
    resume_key: Mapped[str | None] = mapped_column(String(1024))
    total_steps: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_fine_tuning_jobs_tenant_created", "tenant_id", "created_at"),)


class FineTuningEvent(Base):
    """A fine-tune's event (preparation report, metrics, status changes); listed newest first."""

    __tablename__ = "fine_tuning_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class FineTunedModel(Base):
    """A tenant's servable adapter: the final model of a fine-tune, or one of its epoch checkpoints.

    id is the name a batch line gives ("ft:BASE:TENANT:SUFFIX:JOB", checkpoints + ":ckpt-step-N"); the
    adapter (PEFT layout, safetensors + config) lives in storage under adapter_key. An image model
    ("ft:gan:..." or "ft:vae:...") has its whole network there instead (workers/images/artifact.py).
    """

    __tablename__ = "fine_tuned_models"
    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    adapter_key: Mapped[str] = mapped_column(String(1024))  # storage prefix of the adapter files
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)  # None: the job's final model
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # at this checkpoint (train/valid loss)
    # Image models (base "gan" or "vae"): workers.images.artifact.ImageModelCard as JSON; None for adapters.
    image_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)


# Tables of other modules, imported so that Base.metadata (Alembic, create_all) holds every table.
import db.feedback  # noqa: E402, F401
