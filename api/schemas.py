"""The OpenAI wire objects, field for field (SDK v3 types), plus genq's documented extensions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from db.batches import RequestCounts
from db.models import Batch, File
from workers.registry import ModelSpec


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str  # batch | fine-tune | batch_output | fine-tune-results ...
    status: Literal["uploaded", "processed", "error"] = "processed"  # deprecated but required by the SDK
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def from_row(cls, row: File) -> FileObject:
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                   purpose=row.purpose, expires_at=row.expires_at)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class _CursorPage(BaseModel):
    """A list the SDK pages through with after=<last id>; first_id and last_id follow from data."""

    object: Literal["list"] = "list"
    data: list[Any]  # narrowed by each page type to objects with an `id`
    has_more: bool  # always present: without it the SDK pages for as long as data is non-empty

    @computed_field  # type: ignore[prop-decorator]
    @property
    def first_id(self) -> str | None:
        return self.data[0].id if self.data else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def last_id(self) -> str | None:
        return self.data[-1].id if self.data else None


class FileList(_CursorPage):
    data: list[FileObject]


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int  # lines in the output file (succeeded)
    failed: int  # lines in the error file
    in_progress: int = 0  # genq: requests of running shards without a result yet
    queued: int = 0  # genq: requests waiting for a worker


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str  # validating | failed | in_progress | finalizing | completed | expired | cancelling | cancelled
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None  # genq: the models named in the file, comma-separated
    usage: BatchUsage | None = None
    retried_from: str | None = None  # genq: the batch whose failed lines this one retries

    @classmethod
    def from_row(cls, row: Batch, *, counts: RequestCounts, usage: dict[str, Any] | None) -> BatchObject:
        return cls(
            id=row.id, endpoint=row.endpoint, errors=BatchErrors.model_validate(row.errors) if row.errors else None,
            input_file_id=row.input_file_id, completion_window=row.completion_window, status=row.status.value,
            output_file_id=row.output_file_id, error_file_id=row.error_file_id, created_at=row.created_at,
            in_progress_at=row.in_progress_at, expires_at=row.expires_at, finalizing_at=row.finalizing_at,
            completed_at=row.completed_at, failed_at=row.failed_at, expired_at=row.expired_at,
            cancelling_at=row.cancelling_at, cancelled_at=row.cancelled_at,
            request_counts=BatchRequestCounts(**counts.as_dict()), metadata=row.metadata_, model=row.model or None,
            usage=BatchUsage.model_validate(usage) if usage else None, retried_from=row.retried_from)


class BatchList(_CursorPage):
    data: list[BatchObject]


class CreateBatchRequest(BaseModel):
    """POST /v1/batches. completion_window: "24h" or any "<N>h"/"<N>d" up to 365 days (genq extension)."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str | None = None  # None: settings.completion_window_default
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; output retention is deployment-wide


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int  # genq extension
    parent: str | None = None  # genq extension: a fine-tuned model's base
    modality: str = "text"  # genq extension: "text" or "image" (gan, vae and the models trained from them)
    image: dict[str, Any] | None = None  # genq extension, trained image models: size, channels, classes

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelObject:
        image = None
        if spec.image_spec:
            card = spec.image_spec
            image = {"size": f"{card['image_size']}x{card['image_size']}", "channels": card["channels"],
                     "classes": card["class_names"]}
        return cls(id=spec.id, created=spec.created, owned_by=spec.owned_by, context_length=spec.context_length,
                   parent=spec.base, modality=spec.modality, image=image)


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    checks: dict[str, str]  # dependency -> "ok" | "disabled" | "error: ..."
