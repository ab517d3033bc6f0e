"""Acceptance, through the servers with the official SDK: a GAN trained on the tenant's pictures, then a batch of
100 /v1/images/generations lines drawn from it.

The stack (tests/e2e/conftest.py) gains a worker for the image queues. Upload scikit-learn's digits as an
.npz, fine-tune `gan` for 3 epochs (events with metrics and a sample grid each, checkpoints, the model
in /v1/models for its tenant), then 100 lines of 2 images each, 4 of them as b64_json: the batch
completes, every PNG exists in storage (fetched through the Files API, and a few through their url),
decodes, is 8x8 grayscale, and lines i and i + 50, which share their seed and class, hold identical bytes.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.e2e.conftest import genq, kill_group, start, wait_status

pytestmark = pytest.mark.slow
LINES = 100


def _digits_npz() -> bytes:
    bunch = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, images=bunch.images.astype(np.uint8) * 15, labels=bunch.target)  # 0..16 -> 0..240
    return buffer.getvalue()


def _decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_a_gan_trained_through_the_api_draws_a_batch_of_100_images(stack) -> None:
    worker = start(genq("worker", "-Q", "genq.gan,genq.vae", "-c", "1", "--no-reaper", "-n", "images@%h"), stack.env,
                   stack.logs / "image-worker.log")
    try:
        client = stack.client()
        dataset = client.files.create(file=("digits.npz", _digits_npz()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="gan", training_file=dataset.id, suffix="digits", seed=0,
                                             method={"type": "gan", "gan": {"hyperparameters": {"n_epochs": 3}}})
        job = wait_status(lambda: client.fine_tuning.jobs.retrieve(job.id), ("succeeded", "failed", "cancelled"), 300,
                          "the GAN fine-tune")
        assert job.status == "succeeded", (job.error, stack.log_tail())
        assert job.fine_tuned_model.startswith("ft:gan:") and job.hyperparameters.n_epochs == 3
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda m: m["step"])
        assert [m["step"] for m in metrics] == [1, 2, 3] and all("d_acc_real" in m for m in metrics)
        grid = _decoded(client.files.content(metrics[-1]["sample_grid_file"]).content)
        assert grid.format == "PNG" and grid.size == (91, 91)
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) == 2
        assert client.files.content(job.result_files[0]).text.startswith("step,d_loss,g_loss")
        listed = {m.id: m for m in client.models.list().data}
        assert listed[job.fine_tuned_model].model_extra["image"]["size"] == "8x8"

        lines = [{"custom_id": f"img-{i}", "method": "POST", "url": "/v1/images/generations",
                  "body": {"model": job.fine_tuned_model, "prompt": str(i % 10), "n": 2, "size": "8x8",
                           "seed": i % 50, "response_format": "b64_json" if i % 25 == 0 else "url"}}
                 for i in range(LINES)]
        batch_file = client.files.create(file=("images.jsonl", "\n".join(json.dumps(line) for line in lines).encode()),
                                         purpose="batch")
        batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/images/generations",
                                      completion_window="24h")
        batch = wait_status(lambda: client.batches.retrieve(batch.id), ("completed", "failed", "expired", "cancelled"),
                            300, "the image batch")
        assert batch.status == "completed" and batch.request_counts.completed == LINES, (batch, stack.log_tail())

        outputs = {}
        urls = []
        for raw in client.files.content(batch.output_file_id).text.splitlines():
            line = json.loads(raw)
            assert line["response"]["status_code"] == 200 and line["error"] is None
            body = line["response"]["body"]
            assert body["size"] == "8x8" and body["output_format"] == "png" and len(body["data"]) == 2
            pngs = []
            for item in body["data"]:
                if "b64_json" in item:
                    pngs.append(base64.b64decode(item["b64_json"]))
                else:
                    pngs.append(client.files.content(item["file_id"]).content)  # the PNG exists in storage
                    urls.append((item["url"], pngs[-1]))
            outputs[line["custom_id"]] = pngs
        assert len(outputs) == LINES
        for pngs in outputs.values():
            assert all(_decoded(png).size == (8, 8) and _decoded(png).mode == "L" for png in pngs)
        for i in range(LINES // 2):
            assert outputs[f"img-{i}"] == outputs[f"img-{i + 50}"], i  # same seed and class: the same bytes
        assert outputs["img-1"] != outputs["img-2"]
        for url, png in urls[:3]:  # the url itself serves the same PNG
            response = httpx.get(url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30)
            assert response.status_code == 200 and response.content == png
    finally:
        kill_group(worker)
