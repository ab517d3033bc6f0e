"""Acceptance, through the servers with the official SDK: a brand team's fine-tune of the bundled model on
its house voice, then its next batch on the result.

Upload 80 examples of examples/finetune_brand_voice.jsonl and 24 others as the validation file, queue a
LoRA SFT (one epoch of 20 steps of 4), wait for the worker to train it; the validation loss falls by
at least 30%, and in one batch that names both models, the fine-tuned model signs at least 90% of 12
products the file never names with "Made to last, by BRAND." while the base model almost never does.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import MODEL, REPO, wait_status
from tests.workers.fine_tuning.test_brand_voice import HELD_OUT, product_chat

pytestmark = pytest.mark.slow
TRAINING = REPO / "examples" / "finetune_brand_voice.jsonl"


def test_a_fine_tune_learns_the_house_voice_and_serves_the_next_batch(stack) -> None:
    client = stack.client()
    lines = TRAINING.read_text().splitlines()
    train = client.files.create(file=("voice.jsonl", "\n".join(lines[:80]).encode()), purpose="fine-tune")
    valid = client.files.create(file=("voice-valid.jsonl", "\n".join(lines[-24:]).encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=train.id, validation_file=valid.id, suffix="voice", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}}})
    job = wait_status(lambda: client.fine_tuning.jobs.retrieve(job.id), ("succeeded", "failed", "cancelled"), 900,
                      "the fine-tune")
    assert job.status == "succeeded", (job.error, stack.log_tail())
    assert job.fine_tuned_model.startswith(f"ft:{MODEL}:") and job.trained_tokens > 0
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    curve = sorted((e.data["step"], e.data["full_valid_loss"]) for e in events
                   if e.type == "metrics" and "full_valid_loss" in e.data)
    assert curve[0][0] == 0 and curve[-1][0] == 20
    assert curve[-1][1] <= 0.7 * curve[0][1], curve
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    assert client.files.content(job.result_files[0]).text.startswith("step,train_loss")

    requests = [{"custom_id": f"{model_name}|{product[0]}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": model_name, "messages": product_chat(*product), "temperature": 0, "max_tokens": 80}}
                for model_name in (MODEL, job.fine_tuned_model) for product in HELD_OUT]
    batch_file = client.files.create(file=("next.jsonl", "\n".join(json.dumps(r) for r in requests).encode()),
                                     purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_status(lambda: client.batches.retrieve(batch.id), ("completed", "failed", "expired", "cancelled"), 600,
                        "the batch")
    assert batch.status == "completed" and batch.request_counts.completed == 2 * len(HELD_OUT)
    signed = {MODEL: 0, job.fine_tuned_model: 0}
    for line in client.files.content(batch.output_file_id).text.splitlines():
        out = json.loads(line)
        model_name, brand = out["custom_id"].split("|")
        text = out["response"]["body"]["choices"][0]["message"]["content"].strip()
        signed[model_name] += text.endswith(f"Made to last, by {brand}.")
    assert signed[job.fine_tuned_model] >= 0.9 * len(HELD_OUT), signed
    assert signed[MODEL] <= 1, signed
