"""The fine-tuning wire objects (OpenAI SDK types fine_tuning.job, .event, .checkpoint) and the create body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import _CursorPage
from db.models import FineTunedModel, FineTuningEvent, FineTuningJob

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    """OpenAI's ranges; "auto" is resolved from the data size when the worker has prepared it."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | int = Field("auto", ge=1, le=50)
    batch_size: Auto | int = Field("auto", ge=1, le=256)
    learning_rate_multiplier: Auto | float = Field("auto", gt=0, le=100)
    beta: Auto | float = Field("auto", gt=0, le=2)  # DPO only
    # genq extension, DPO only: weight of the chosen replies' NLL added to the DPO loss (RPO; 0: textbook DPO)
    chosen_nll_weight: float = Field(0.0, ge=0, le=10)


class MethodDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class ImageHyperparameters(BaseModel):
    """genq's image methods (gan, vae); the ranges and "auto" rules are workers/images/hyperparameters.py's."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | int = Field("auto", ge=1, le=200)
    batch_size: Auto | int = Field("auto", ge=1, le=1024)
    learning_rate_multiplier: Auto | float = Field("auto", gt=0, le=100)
    image_size: Auto | Literal[8, 16, 32, 64] = "auto"
    latent_dim: Auto | int = Field("auto", ge=2, le=512)
    beta: Auto | float = Field("auto", gt=0, le=100)  # VAE only: the KL term's weight


class ImageMethodDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: ImageHyperparameters = Field(default_factory=ImageHyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "gan", "vae"] = "supervised"  # gan, vae: genq's image models
    supervised: MethodDetail | None = None
    dpo: MethodDetail | None = None
    gan: ImageMethodDetail | None = None
    vae: ImageMethodDetail | None = None

    def hyperparameters(self) -> Hyperparameters:
        detail = self.dpo if self.type == "dpo" else self.supervised
        return detail.hyperparameters if detail else Hyperparameters()

    def image_hyperparameters(self) -> ImageHyperparameters:
        detail = self.gan if self.type == "gan" else self.vae
        return detail.hyperparameters if detail else ImageHyperparameters()


class LoraSettings(BaseModel):
    """genq extension: the adapter's shape (defaults: rank 8, alpha 16, no dropout, every projection)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0, le=1024)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"], min_length=1)


class CreateFineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2_147_483_647)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None  # accepted and ignored (no wandb here)
    lora: LoraSettings = Field(default_factory=LoraSettings)

    def resolved_method(self) -> Method:
        """method, or the deprecated top-level hyperparameters as a supervised method."""
        if self.method is not None:
            return self.method
        return Method(type="supervised", supervised=MethodDetail(hyperparameters=self.hyperparameters
                                                                 or Hyperparameters()))


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    status: str
    training_file: str
    validation_file: str | None
    error: FineTuningError | None
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    hyperparameters: dict[str, Any]
    organization_id: str
    result_files: list[str]
    seed: int
    estimated_finish: int | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    integrations: list[Any] | None = None

    @classmethod
    def from_row(cls, row: FineTuningJob) -> FineTuningJobObject:
        method = dict(row.method)
        hyper = row.hyperparameters or method.get(method["type"], {}).get("hyperparameters", {})
        return cls(id=row.id, created_at=row.created_at, model=row.model, status=row.status.value,
                   training_file=row.training_file, validation_file=row.validation_file,
                   error=FineTuningError(**row.error) if row.error else None, fine_tuned_model=row.fine_tuned_model,
                   finished_at=row.finished_at, trained_tokens=row.trained_tokens, hyperparameters=hyper,
                   organization_id=row.tenant_id, result_files=list(row.result_files or []), seed=row.seed,
                   estimated_finish=row.estimated_finish, metadata=row.metadata_, method=method)


class FineTuningJobList(_CursorPage):
    data: list[FineTuningJobObject]


class FineTuningEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: FineTuningEvent) -> FineTuningEventObject:
        return cls(id=f"ftevent-{row.id}", created_at=row.created_at, level=row.level, message=row.message,
                   type=row.type, data=row.data)


class FineTuningEventList(_CursorPage):
    data: list[FineTuningEventObject]


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: FineTunedModel) -> CheckpointObject:
        return cls(id=checkpoint_id(row), created_at=row.created_at, fine_tuned_model_checkpoint=row.id,
                   fine_tuning_job_id=row.job_id, step_number=row.checkpoint_step or 0, metrics=row.metrics or {})


class CheckpointList(_CursorPage):
    data: list[CheckpointObject]


def checkpoint_id(row: FineTunedModel) -> str:
    """"ftckpt_" + the job's id digits + the step: stable, so `after` cursors work."""
    return f"ftckpt_{row.job_id.removeprefix('ftjob-')}_{row.checkpoint_step}"
