"""Image models through the API and the official SDK: a zip dataset uploads and queues a gan/vae fine-tune;
each wrong method, hyperparameter or file is a 400 naming it; /v1/images/generations lines are checked
against the tenant's trained model (its card) at create, each refusal naming the line and parameter;
image models are their tenant's alone."""

from __future__ import annotations

import io
import zipfile

import openai
import pytest

from db.fine_tuning import add_fine_tune, add_model
from tests.api.conftest import chat_line, jsonl, sft_lines
from tests.api.test_fine_tuning import _refusal, _upload, neighbour  # noqa: F401 (a fixture)
from workers.registry import BUNDLED_MODEL_ID

IMAGES = "/v1/images/generations"
CARD = {"architecture": "gan", "image_size": 8, "channels": 1, "latent_dim": 16, "base_channels": 32, "sigma": 0.1,
        "class_names": ["circle", "square"]}


def _dataset() -> bytes:
    """A zip whose bytes would trip the JSONL upload checks (brackets nested 5,000 deep) were it read as text."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("circle/a.png", b"[" * 5000)
        archive.writestr("square/b.png", b"{" * 5000)
    return buffer.getvalue()


def _upload_dataset(client) -> str:
    return client.files.create(file=("pictures.zip", io.BytesIO(_dataset())), purpose="fine-tune").id


@pytest.fixture
def image_model(session, tenant) -> str:
    """A trained GAN of the tenant's (its row and card; the batch checks need no weights)."""
    job, _ = add_fine_tune(session=session, job_id="ftjob-images0000000000000001", tenant_id=tenant.id, model="gan",
                           training_file="file-x", validation_file=None, method={"type": "gan"}, suffix="shapes",
                           seed=1, metadata=None, queue="genq.gan")
    name = f"ft:gan:{tenant.name}:shapes:images0000000000000001"
    add_model(session=session, model_id=name, tenant_id=tenant.id, job_id=job.id, base_model="gan",
              adapter_key="fine_tunes/x/model/", checkpoint_step=None, metrics=None, image_spec=CARD)
    session.commit()
    return name


def test_an_image_dataset_uploads_and_queues_a_fine_tune(client) -> None:
    file_id = _upload_dataset(client)
    job = client.fine_tuning.jobs.create(model="gan", training_file=file_id, suffix="shapes", method={
        "type": "gan", "gan": {"hyperparameters": {"n_epochs": 7, "image_size": 16}}})
    assert job.status == "queued" and job.model == "gan" and job.method.type == "gan"
    assert job.method.model_extra["gan"]["hyperparameters"]["image_size"] == 16
    vae = client.fine_tuning.jobs.create(model="vae", training_file=file_id)  # method defaults to the architecture
    assert vae.method.type == "vae" and vae.method.model_extra["vae"]["hyperparameters"]["beta"] == "auto"


@pytest.mark.parametrize(("model", "method", "param"), [
    ("gan", {"type": "vae"}, "method.type"),
    ("gan", {"type": "supervised"}, "method.type"),
    (BUNDLED_MODEL_ID, {"type": "gan"}, "method.type"),
    ("gan", {"type": "gan", "gan": {"hyperparameters": {"beta": 0.5}}}, "method.gan.hyperparameters.beta"),
    ("vae", {"type": "vae", "vae": {"hyperparameters": {"image_size": 12}}}, "method.vae.hyperparameters.image_size"),
    ("vae", {"type": "vae", "vae": {"hyperparameters": {"latent_dim": 1}}}, "method.vae.hyperparameters.latent_dim"),
])
def test_a_wrong_image_method_is_refused_naming_it(client, model, method, param) -> None:
    refused = _refusal(lambda: client.fine_tuning.jobs.create(model=model, training_file=_upload_dataset(client),
                                                              method=method))
    assert refused["status"] == 400 and refused["param"].startswith(param), refused


def test_a_text_file_is_not_an_image_dataset(client) -> None:
    refused = _refusal(lambda: client.fine_tuning.jobs.create(model="vae", training_file=_upload(client,
                                                                                                 sft_lines(12))))
    assert refused["status"] == 400 and refused["code"] == "invalid_file_format" and refused["param"] == "training_file"


def _line(custom_id: str, model: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": IMAGES, "body": {"model": model, **body}}


def _create(client, lines, endpoint=IMAGES):
    return client.batches.create(input_file_id=_upload(client, lines, purpose="batch"), endpoint=endpoint,
                                 completion_window="24h")


def test_image_lines_queue_for_the_image_workers(client, session, image_model) -> None:
    batch = _create(client, [_line("a", image_model, prompt="circle", n=4, size="8x8", seed=1),
                             _line("b", image_model, prompt="square", response_format="b64_json")])
    assert batch.endpoint == IMAGES and batch.request_counts.total == 2
    from db.batches import list_shards

    assert {s.queue for s in list_shards(session=session, batch_id=batch.id)} == {"genq.gan"}


@pytest.mark.parametrize(("line", "endpoint", "code", "param"), [
    (_line("x", "ft:gan:nobody:x:000"), IMAGES, "model_not_found", "body.model"),
    (_line("x", "gan"), IMAGES, "model_not_found", "body.model"),  # the architecture, untrained
    (_line("x", BUNDLED_MODEL_ID, prompt="a cat"), IMAGES, "unsupported_model", "body.model"),
    (_line("x", "MODEL", prompt="circle", size="16x16"), IMAGES, "invalid_value", "body.size"),
    (_line("x", "MODEL", prompt="circle", size="8x16"), IMAGES, "invalid_value", "body.size"),
    (_line("x", "MODEL", prompt="triangle"), IMAGES, "invalid_value", "body.prompt"),
    (_line("x", "MODEL", prompt="circle", n=101), IMAGES, "invalid_value", "body.n"),
    (_line("x", "MODEL", prompt="circle", response_format="png"), IMAGES, "invalid_value", "body.response_format"),
    (_line("x", "MODEL", prompt="circle", mode="interpolate", to_prompt="square", n=3), IMAGES, "invalid_value",
     "body.mode"),  # a GAN has no encoder or embedding path to interpolate
    (_line("x", "MODEL", prompt="circle", quality="hd"), IMAGES, "unknown_parameter", "body.quality"),
    (chat_line("x", model="MODEL"), "/v1/chat/completions", "unsupported_model", "body.model"),
])
def test_a_bad_image_line_is_refused_at_create(client, image_model, line, endpoint, code, param) -> None:
    if line["body"]["model"] == "MODEL":
        line["body"]["model"] = image_model
    if endpoint != IMAGES:
        line["url"] = endpoint
    good = _line("ok", image_model, prompt="circle") if endpoint == IMAGES else chat_line("ok")
    refused = _refusal(lambda: _create(client, [good, line], endpoint=endpoint))
    assert refused["status"] == 400 and refused["code"] == code and refused["param"] == param, refused
    assert refused["line"] == 2 and refused["message"].startswith("Line 2: ")


def test_image_models_are_their_tenants_alone(client, image_model, neighbour) -> None:  # noqa: F811
    _, other = neighbour
    listed = {m.id: m for m in client.models.list().data}
    assert listed[image_model].model_extra["modality"] == "image"
    assert listed[image_model].model_extra["image"] == {"size": "8x8", "channels": 1, "classes": ["circle", "square"]}
    assert image_model not in [m.id for m in other.models.list().data]
    refused = _refusal(lambda: _create(other, [_line("x", image_model, prompt="circle")]))
    assert refused["code"] == "model_not_found" and refused["line"] == 1


def test_a_zip_passes_the_upload_checks_that_jsonl_gets(client, http, api_key) -> None:
    too_deep = jsonl([b"[" * 5000])
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("deep.jsonl", io.BytesIO(too_deep)), purpose="fine-tune")
    assert _upload_dataset(client).startswith("file-")


def test_a_line_error_names_the_parameter_without_garbling_the_message(client, image_model) -> None:
    line = _line("x", image_model, prompt="circle", mode="reconstruct", image="aGk=", n=2)
    refused = _refusal(lambda: _create(client, [line]))
    assert refused["param"] == "body.n" and refused["message"] == \
        "Line 1: mode 'reconstruct' returns one image: body.n must be 1"
