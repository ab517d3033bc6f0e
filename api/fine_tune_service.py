"""Creating a fine-tune: the checks a request must pass before anything is queued.

An image model ("gan", "vae") takes a zip of pictures or an .npz as its training file and method
type gan or vae; here the file must be the tenant's, of purpose fine-tune and a zip archive (an .npz
is one), and the hyperparameters in range. Reading every image needs the worker (status
validating_files), which fails the job naming the member when the dataset is unusable.

The base model must be one this deployment serves; the files must be the tenant's, of purpose
fine-tune, and valid line by line for the method (workers/fine_tuning/data.py, torch-free: the same
checks the worker's preparation starts with), the validation file in the training file's format. Each
refusal is a 400 naming the parameter, and for a bad line its number. Tokenizing, truncation and the
validation split need the model's tokenizer, so the worker does them (status validating_files) and
reports them as the job's first events.
"""

from __future__ import annotations

import io
import secrets
import zipfile
from typing import Any

from sqlalchemy.orm import Session

from api.errors import InvalidRequest, no_such
from api.fine_tuning_schemas import CreateFineTuningJobRequest, Method
from db.files import FINE_TUNE_PURPOSE, get_file
from db.fine_tuning import add_fine_tune, new_fine_tune_id
from db.models import FineTuningJob, Shard
from genq.settings import Settings
from storage import Store
from workers.dispatch import queue_for_model
from workers.fine_tuning.data import TrainingFileError, check_validation_format, read_training_file
from workers.registry import IMAGE, IMAGE_ARCHITECTURES, list_models


def _checked_file(*, session: Session, store: Store, tenant_id: str, file_id: str, param: str) -> bytes:
    file = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    if file is None:  # another tenant's file is not found either
        raise no_such("File object", file_id, param=param)
    if file.purpose != FINE_TUNE_PURPOSE:
        raise InvalidRequest(f"file {file_id!r} has purpose {file.purpose!r}; a fine-tune needs 'fine-tune'",
                             param=param, code="invalid_file_purpose")
    return store.get_bytes(file.storage_key)


def _file_error(error: TrainingFileError, param: str, which: str) -> InvalidRequest:
    extra = {"line": error.line} if error.line is not None else {}
    return InvalidRequest(f"The {which} file is not valid: {error.message}", param=param, code=error.code.value,
                          extra=extra)


def create_fine_tune(*, session: Session, store: Store, settings: Settings, tenant_id: str,
                     body: CreateFineTuningJobRequest) -> tuple[FineTuningJob, Shard]:
    """Checks the request and inserts the job (queued) with its shard; the caller commits and enqueues."""
    bases = {spec.id: spec for spec in list_models(settings)}
    if body.model not in bases:
        raise InvalidRequest(f"model {body.model!r} cannot be fine-tuned here; base models: {', '.join(sorted(bases))} "
                             "(GET /v1/models)", param="model", code="model_not_found")
    if bases[body.model].modality == IMAGE:
        return _create_image_fine_tune(session=session, store=store, tenant_id=tenant_id, body=body)
    method = body.resolved_method()
    if method.type in IMAGE_ARCHITECTURES:
        raise InvalidRequest(f"method.type {method.type!r} trains an image model: set model to {method.type!r}, "
                             f"not the language model {body.model!r}", param="method.type", code="invalid_value")
    training = _checked_file(session=session, store=store, tenant_id=tenant_id, file_id=body.training_file,
                             param="training_file").splitlines()
    try:
        read_training_file(training, method.type)
    except TrainingFileError as exc:
        raise _file_error(exc, "training_file", "training") from None
    if body.validation_file:
        validation = _checked_file(session=session, store=store, tenant_id=tenant_id, file_id=body.validation_file,
                                   param="validation_file").splitlines()
        try:
            check_validation_format(method.type, validation)
            read_training_file(validation, method.type, min_examples=1)
        except TrainingFileError as exc:
            raise _file_error(exc, "validation_file", "validation") from None
    dpo_only = {"beta", "chosen_nll_weight"} if method.type == "supervised" else set()
    stored_method = {"type": method.type, method.type: {"hyperparameters": method.hyperparameters().model_dump(
        exclude=dpo_only)}, "lora": body.lora.model_dump()}
    return _add(session, tenant_id, body, stored_method)


def _add(session: Session, tenant_id: str, body: CreateFineTuningJobRequest, stored_method: dict[str, Any]
         ) -> tuple[FineTuningJob, Shard]:
    seed = body.seed if body.seed is not None else secrets.randbelow(2_147_483_648)
    return add_fine_tune(session=session, job_id=new_fine_tune_id(), tenant_id=tenant_id, model=body.model,
                         training_file=body.training_file, validation_file=body.validation_file,
                         method=stored_method, suffix=body.suffix, seed=seed, metadata=body.metadata,
                         queue=queue_for_model(body.model))


def _create_image_fine_tune(*, session: Session, store: Store, tenant_id: str, body: CreateFineTuningJobRequest
                            ) -> tuple[FineTuningJob, Shard]:
    """An image model's job: method type = the architecture, its hyperparameters, a zip dataset."""
    architecture = body.model
    if body.hyperparameters is not None:
        raise InvalidRequest(f"image models take method.{architecture}.hyperparameters, not the top-level "
                             "hyperparameters", param="hyperparameters", code="invalid_value")
    method = body.method or Method(type=architecture)  # type: ignore[arg-type]
    if method.type != architecture:
        raise InvalidRequest(f"model {architecture!r} trains with method.type {architecture!r}, not {method.type!r}",
                             param="method.type", code="invalid_value")
    hyperparameters = method.image_hyperparameters().model_dump()
    if architecture == "gan" and hyperparameters["beta"] != "auto":
        raise InvalidRequest("beta weights a VAE's KL term; a GAN has none", param="method.gan.hyperparameters.beta",
                             code="invalid_value")
    for param, file_id in (("training_file", body.training_file), ("validation_file", body.validation_file)):
        if file_id and not zipfile.is_zipfile(io.BytesIO(_checked_file(
                session=session, store=store, tenant_id=tenant_id, file_id=file_id, param=param))):
            raise InvalidRequest(f"{param} {file_id!r} is not an image dataset: upload a zip of PNG/JPEG files in "
                                 "one folder per class, or an .npz with `images` and optional `labels`",
                                 param=param, code="invalid_file_format")
    return _add(session, tenant_id, body, {"type": architecture, architecture: {"hyperparameters": hyperparameters}})
