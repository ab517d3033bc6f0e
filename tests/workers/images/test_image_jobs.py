"""The image fine-tune job kind and image batch lines, in-process on PostgreSQL and a local store.

A GAN and a VAE fine-tune on digits through api.fine_tune_service.create_fine_tune and
run_fine_tune_shard: statuses, per-epoch metrics events linking a sample-grid PNG, checkpoints, the
model row and its card, the result CSV; a crashed attempt resumes from its last epoch and publishes
the same model bytes as an uninterrupted run; cancel stops it. Then /v1/images/generations lines
through api.batch_service.create_batch and run_shard: PNG files of the right size, same seed ->
same bytes, b64_json, VAE reconstruction and interpolation, and each bad dataset failing its job
in validating_files with the member named.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from api.fine_tune_service import create_fine_tune
from api.fine_tuning_schemas import CreateFineTuningJobRequest
from db.files import create_file, file_storage_key, new_file_id
from db.fine_tuning import cancel, checkpoints, delete_model, list_events, tenant_model
from db.models import Batch, BatchStatus, File, FineTuneStatus, FineTuningJob, RequestResult
from db.session import session_scope
from storage import store_from_settings
from tests.workers.images.conftest import digits_npz as digits_npz_file
from workers.batches.shard_runner import run_shard
from workers.fine_tuning.job_runner import run_fine_tune_shard
from workers.images import batch as image_batch
from workers.images import job as image_job
from workers.images.artifact import MODEL_WEIGHTS_FILE
from workers.retention import collect
from workers.shard_outcome import ShardRun

IMAGES_URL = "/v1/images/generations"


@pytest.fixture
def db_url(postgres_url):
    """One database here (the batch and fine-tune machinery runs on both elsewhere): training is the cost."""
    return postgres_url


@pytest.fixture(scope="module")
def digits_npz() -> bytes:
    return digits_npz_file()


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _create(settings, tenant_id, data: bytes, *, model="gan", hyperparameters=None, seed=5):
    store = store_from_settings(settings)
    file_id = new_file_id()
    store.put_bytes(file_storage_key(file_id), data)
    hyper = {"n_epochs": 3, **(hyperparameters or {})}
    body = CreateFineTuningJobRequest(model=model, training_file=file_id, suffix="digits", seed=seed,
                                      method={"type": model, model: {"hyperparameters": hyper}})
    with session_scope(settings.database_url) as session:
        create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="digits.npz", purpose="fine-tune",
                    size=len(data))
        job, shard = create_fine_tune(session=session, store=store, settings=settings, tenant_id=tenant_id, body=body)
        return job.id, shard.id


def _job(settings, job_id) -> FineTuningJob:
    with session_scope(settings.database_url) as session:
        job = session.get(FineTuningJob, job_id)
        session.expunge(job)
        return job


def _events(settings, job_id):
    with session_scope(settings.database_url) as session:
        events, _ = list_events(session=session, job_id=job_id, after=None, limit=1000)
        for event in events:
            session.expunge(event)
        return list(reversed(events))


def _file_bytes(settings, file_id) -> bytes:
    with session_scope(settings.database_url) as session:
        key = session.get(File, file_id).storage_key
    return store_from_settings(settings).get_bytes(key)


def _model_weights(settings, tenant_id, model_id) -> bytes:
    with session_scope(settings.database_url) as session:
        prefix = tenant_model(session=session, tenant_id=tenant_id, model_id=model_id).adapter_key
    return store_from_settings(settings).get_bytes(prefix + MODEL_WEIGHTS_FILE)


def _image_line(custom_id: str, model: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": IMAGES_URL, "body": {"model": model, **body}}


def _run_batch(settings, make_batch, lines):
    made = make_batch(lines, endpoint=IMAGES_URL)
    for shard_id in made.shard_ids:
        assert run_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.DONE
    with session_scope(settings.database_url) as session:
        batch = session.get(Batch, made.batch_id)
        assert batch.status == BatchStatus.COMPLETED, batch.errors
        rows = session.scalars(select(RequestResult).where(RequestResult.batch_id == made.batch_id)).all()
        return {row.custom_id: row.output_line for row in rows}


def test_a_gan_trains_checkpoints_and_draws_a_batch(settings, tenant_id, digits_npz, make_batch, one_thread):
    job_id, shard_id = _create(settings, tenant_id, digits_npz, model="gan")
    outcome = run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1")
    assert outcome.status == ShardRun.DONE, outcome
    job = _job(settings, job_id)
    assert job.status == FineTuneStatus.SUCCEEDED and job.error is None
    assert job.fine_tuned_model.startswith("ft:gan:") and job.fine_tuned_model.split(":")[3] == "digits"
    assert job.hyperparameters == {"n_epochs": 3, "batch_size": 64, "learning_rate_multiplier": 1.0, "image_size": 8,
                                   "latent_dim": 16}
    assert job.step == job.total_steps == 3

    events = _events(settings, job_id)
    assert events[1].message.startswith("Prepared 1618 training and 179 validation images") \
        and events[1].data["classes"] == [str(k) for k in range(10)]
    metrics = [e for e in events if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == [1, 2, 3]
    for event in metrics:
        assert {"d_loss", "g_loss", "d_acc_real", "d_acc_fake"} <= set(event.data)
        grid = Image.open(io.BytesIO(_file_bytes(settings, event.data["sample_grid_file"])))
        assert grid.format == "PNG" and grid.size == (10 * 9 + 1, 10 * 9 + 1)  # 10 classes x 10 samples of 8 + 1
    with session_scope(settings.database_url) as session:
        kept = [row.id for row in checkpoints(session=session, job_id=job_id)]
        card = tenant_model(session=session, tenant_id=tenant_id, model_id=job.fine_tuned_model).image_spec
    assert kept == [f"{job.fine_tuned_model}:ckpt-step-{k}" for k in (2, 1)]
    assert card["architecture"] == "gan" and card["image_size"] == 8 and card["channels"] == 1
    table = list(csv.DictReader(io.StringIO(_file_bytes(settings, job.result_files[0]).decode())))
    assert [row["step"] for row in table] == ["1", "2", "3"] and float(table[-1]["d_loss"]) > 0

    model = job.fine_tuned_model
    outputs = _run_batch(settings, make_batch, [
        _image_line("a", model, prompt="3", n=4, seed=11, size="8x8"),
        _image_line("b", model, prompt="3", n=4, seed=11),
        _image_line("c", model, prompt="7", n=2, response_format="b64_json"),
        _image_line("d", f"{model}:ckpt-step-2", prompt="0", n=1, seed=11)])
    pngs = {}
    for custom_id in "ab":
        body = outputs[custom_id]["response"]["body"]
        assert body["size"] == "8x8" and len(body["data"]) == 4
        pngs[custom_id] = [_file_bytes(settings, item["file_id"]) for item in body["data"]]
        assert all(item["url"].endswith(f"/files/{item['file_id']}/content") for item in body["data"])
    assert pngs["a"] == pngs["b"] and len(set(pngs["a"])) == 4  # same seed, same bytes; four different draws
    inline = outputs["c"]["response"]["body"]["data"]
    assert all(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (8, 8) for item in inline)
    assert outputs["d"]["response"]["status_code"] == 200  # a checkpoint serves too


def test_a_vae_reports_elbo_and_pca_and_reconstructs_and_interpolates(settings, tenant_id, digits_npz, make_batch,
                                                                      one_thread):
    job_id, shard_id = _create(settings, tenant_id, digits_npz, model="vae", hyperparameters={"n_epochs": 4})
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.DONE
    job = _job(settings, job_id)
    assert job.hyperparameters["beta"] == 1.0 and job.hyperparameters["latent_dim"] == 8
    metrics = [e.data for e in _events(settings, job_id) if e.type == "metrics"]
    assert len(metrics) == 4 and all({"valid_elbo", "valid_kl", "valid_recon_mse", "pca_recon_mse"} <= set(m)
                                      for m in metrics)
    assert metrics[-1]["valid_elbo"] > metrics[0]["valid_elbo"]

    source = Image.open(io.BytesIO(base64.b64decode(_reference_png()))).size
    outputs = _run_batch(settings, make_batch, [
        _image_line("rec", job.fine_tuned_model, prompt="5", mode="reconstruct", image=_reference_png()),
        _image_line("mix", job.fine_tuned_model, prompt="1", mode="interpolate", to_prompt="7", n=5, seed=2),
        _image_line("bad", job.fine_tuned_model, prompt="5", mode="reconstruct",
                    image=base64.b64encode(b"not a picture").decode())])
    assert source == (24, 24)
    assert len(outputs["rec"]["response"]["body"]["data"]) == 1
    steps = [_file_bytes(settings, item["file_id"]) for item in outputs["mix"]["response"]["body"]["data"]]
    assert len(set(steps)) == 5 and all(Image.open(io.BytesIO(png)).size == (8, 8) for png in steps)
    bad = outputs["bad"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "image"


def _reference_png() -> str:
    """A 24x24 grayscale picture of a bar (resized to the model's 8x8 by the worker), base64."""
    pixels = np.zeros((24, 24), dtype=np.uint8)
    pixels[4:20, 10:14] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_crashed_attempt_resumes_and_publishes_the_same_model(settings, tenant_id, digits_npz, monkeypatch,
                                                               one_thread):
    straight_id, straight_shard = _create(settings, tenant_id, digits_npz, hyperparameters={"n_epochs": 3}, seed=9)
    assert run_fine_tune_shard(settings=settings, shard_id=straight_shard, worker_id="w1").status == ShardRun.DONE

    job_id, shard_id = _create(settings, tenant_id, digits_npz, hyperparameters={"n_epochs": 3}, seed=9)
    real_save = image_job._save_epoch

    def die_after_the_second(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[3].epoch == 2:
            raise MemoryError("the worker died")

    monkeypatch.setattr(image_job, "_save_epoch", die_after_the_second)
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.RELEASED
    monkeypatch.setattr(image_job, "_save_epoch", real_save)
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w2").status == ShardRun.DONE

    resumed, straight = _job(settings, job_id), _job(settings, straight_id)
    assert resumed.status == FineTuneStatus.SUCCEEDED
    messages = [e.message for e in _events(settings, job_id)]
    assert "Resumed from epoch 2 of 3 (attempt 2)" in messages
    assert [e.data["step"] for e in _events(settings, job_id) if e.type == "metrics"] == [1, 2, 3]
    assert _model_weights(settings, tenant_id, resumed.fine_tuned_model) == \
        _model_weights(settings, tenant_id, straight.fine_tuned_model)


def test_cancel_stops_an_image_job(settings, tenant_id, digits_npz, monkeypatch, one_thread):
    job_id, shard_id = _create(settings, tenant_id, digits_npz, hyperparameters={"n_epochs": 5})
    real_save = image_job._save_epoch

    def cancel_after_the_first(*args, **kwargs):
        real_save(*args, **kwargs)
        with session_scope(settings.database_url) as session:
            cancel(session=session, tenant_id=tenant_id, job_id=job_id)

    monkeypatch.setattr(image_job, "_save_epoch", cancel_after_the_first)
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.CANCELLED
    job = _job(settings, job_id)
    assert job.status == FineTuneStatus.CANCELLED and job.step <= 2 and job.fine_tuned_model is None


BIG = b"\0" * (1 << 20)


def _broken_chunk_png() -> bytes:
    """A PNG whose second IDAT chunk has a zeroed type: PIL raises SyntaxError, not OSError, while decoding."""
    png = _png(10, size=64)
    start = png.find(b"IDAT")
    length = int.from_bytes(png[start - 4 : start], "big")
    data = png[start + 4 : start + 4 + length]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + (zlib.crc32(kind + body) & 0xFFFFFFFF).to_bytes(4, "big")

    return png[: start - 4] + chunk(b"IDAT", data[: len(data) // 2]) + b"\0" * 8 + b"garbage" * 10


@pytest.mark.parametrize(("members", "named", "why"), [
    ({"cat/a.png": _png(10), "cat/b.png": b"\x89PNG\r\n\x1a\n broken", "dog/c.png": _png(30), "dog/d.png": _png(40)},
     "cat/b.png", "not a readable PNG or JPEG"),
    ({"cat/a.png": _png(10), "cat/b.png": _broken_chunk_png(), "dog/c.png": _png(30), "dog/d.png": _png(40)},
     "cat/b.png", "cannot decode the image"),
    ({"cat/a.png": _png(10), "cat/b.png": _png(20), "cat/huge.png": BIG}, "cat/huge.png", "uncompressed"),
    ({"cat/a.png": _png(10), "cat/b.png": _png(20), "cat/notes.txt": b"hello"}, "cat/notes.txt", "not a PNG or JPEG"),
    ({}, None, "holds no images"),
    ({"cat/a.png": _png(10), "cat/b.png": _png(20), "dog/c.png": _png(30)}, "dog/c.png", "has 1 distinct image"),
])
def test_a_bad_dataset_fails_in_validating_files_naming_the_member(settings, tenant_id, monkeypatch, members, named,
                                                                   why):
    monkeypatch.setattr("workers.images.data.MAX_MEMBER_BYTES", 1 << 19)  # so the bomb case stays small
    job_id, shard_id = _create(settings, tenant_id, _zip(members))
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.FAILED
    job = _job(settings, job_id)
    assert job.status == FineTuneStatus.FAILED and job.error["code"] == "invalid_training_file"
    assert why in job.error["message"] and (named is None or named in job.error["message"]), job.error
    assert job.started_at is not None and job.hyperparameters == {}  # it never left validating_files
    assert json.dumps(job.error)  # an OpenAI error object, nothing else


def test_an_unconditional_rgb_dataset_trains_and_draws_at_its_size(settings, tenant_id, make_batch, one_thread):
    rng = np.random.default_rng(0)
    members = {}
    for i in range(12):  # top-level files: no classes; colour pictures of 20x24, cropped and resized to 16
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
        members[f"pic-{i}.png"] = buffer.getvalue()
    job_id, shard_id = _create(settings, tenant_id, _zip(members), model="vae",
                               hyperparameters={"n_epochs": 2, "image_size": 16})
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.DONE
    job = _job(settings, job_id)
    with session_scope(settings.database_url) as session:
        card = tenant_model(session=session, tenant_id=tenant_id, model_id=job.fine_tuned_model).image_spec
    assert card["class_names"] == [] and card["channels"] == 3 and card["image_size"] == 16
    outputs = _run_batch(settings, make_batch, [_image_line("u", job.fine_tuned_model, n=2, size="16x16")])
    for item in outputs["u"]["response"]["body"]["data"]:
        image = Image.open(io.BytesIO(_file_bytes(settings, item["file_id"])))
        assert image.size == (16, 16) and image.mode == "RGB"


def test_a_line_that_breaks_fails_alone_and_a_deleted_model_fails_its_lines(settings, tenant_id, digits_npz,
                                                                           make_batch, monkeypatch, one_thread):
    job_id, shard_id = _create(settings, tenant_id, digits_npz, hyperparameters={"n_epochs": 1})
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.DONE
    model = _job(settings, job_id).fine_tuned_model
    real_draw = image_batch.draw

    def draw_or_break(network, card, request, seed):
        if request.prompt == "4":
            raise IndexError("a bug this line alone meets")
        return real_draw(network, card, request, seed)

    monkeypatch.setattr(image_batch, "draw", draw_or_break)
    outputs = _run_batch(settings, make_batch, [_image_line(f"l{k}", model, prompt=str(k)) for k in range(3, 6)])
    assert [outputs[f"l{k}"]["response"]["status_code"] for k in (3, 4, 5)] == [200, 500, 200]
    assert outputs["l4"]["response"]["body"]["error"]["code"] == "generation_failed"

    made = make_batch([_image_line("gone", model, prompt="1")], endpoint=IMAGES_URL)
    with session_scope(settings.database_url) as session:
        delete_model(session=session, tenant_id=tenant_id, model_id=model)
    assert run_shard(settings=settings, shard_id=made.shard_ids[0], worker_id="w1").status == ShardRun.DONE
    with session_scope(settings.database_url) as session:
        line = session.scalars(select(RequestResult).where(RequestResult.batch_id == made.batch_id)).one().output_line
    assert line["response"]["status_code"] == 404 and line["response"]["body"]["error"]["code"] == "model_not_found"


def test_retention_removes_a_batch_s_pngs_with_it(settings, tenant_id, digits_npz, make_batch, one_thread):
    job_id, shard_id = _create(settings, tenant_id, digits_npz, hyperparameters={"n_epochs": 1})
    assert run_fine_tune_shard(settings=settings, shard_id=shard_id, worker_id="w1").status == ShardRun.DONE
    outputs = _run_batch(settings, make_batch, [_image_line("p", _job(settings, job_id).fine_tuned_model,
                                                            prompt="2", n=3)])
    ids = [item["file_id"] for item in outputs["p"]["response"]["body"]["data"]]
    with session_scope(settings.database_url) as session:
        keys = [session.get(File, file_id).storage_key for file_id in ids]
    store = store_from_settings(settings)
    assert all(store.get_bytes(key) for key in keys)
    collect(settings, now=time.time() + settings.batch_retention_seconds + 60)
    with session_scope(settings.database_url) as session:
        assert all(session.get(File, file_id) is None for file_id in ids)
    assert not any(store.exists(key) for key in keys)
