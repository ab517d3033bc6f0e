"""Acceptance: the feedback loop on the bundled SmolLM2-135M. The base model writes a catalog batch; its
editors correct each output (exclamation marks removed, cut to whole sentences, the house sign-off
"Made to last, by BRAND." appended); the feedback export (genq.feedback_export, what
POST /v1/batches/{id}/feedback/export runs) makes a DPO file of them; a DPO fine-tune trains on it.
On 40 products of the catalog that were not in the batch, the share of greedy outputs with the
corrected behaviour (signed, no "!") rises by at least 30 points over the base model, and the
preferred-minus-rejected log-probability margin on held-out pairs rises.

DPO runs with the chosen replies' NLL added (chosen_nll_weight 1, RPO): textbook DPO (weight 0) on
these 43 pairs lowers the chosen replies' likelihood too and the greedy text degenerates into
"Made to last. Made to last. ..." (measured: 0 of 40 signed). About four minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from genq.feedback_export import ExportFormat, RatedLine, build_examples, training_jsonl
from workers.fine_tuning.data import Method, read_training_file
from workers.fine_tuning.hyperparameters import ResolvedHyperparameters
from workers.fine_tuning.lora import LoraConfig, merge_into
from workers.fine_tuning.prepare import prepare
from workers.fine_tuning.trainer import Trainer, TrainerConfig
from workers.registry import bundled_gguf_path
from workers.runtime.loader import read_checkpoint, serve_checkpoint
from workers.runtime.model import build_model
from workers.runtime.types import GenerationRequest, SamplingParams
from workers.runtime.weights import fuse_projections

pytestmark = pytest.mark.slow

CATALOG = Path(__file__).parents[3] / "examples" / "catalog_sample.csv"
SYSTEM = "You write product copy in the house voice."
MAX_TOKENS = 64


def product_messages(row: dict[str, str]) -> list[dict[str, str]]:
    data = (f"Product data:\nTitle: {row['title']}\nBrand: {row['brand']}\nCategory: {row['category']}\n"
            f"Material: {row['material']}\nVariant: {row['variant']}\nColor: {row['color']}\n"
            f"Price: ${row['price_usd']}\nFeatures: {row['features']}\n\nWrite the description.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": data}]


def corrected(output: str, brand: str) -> str:
    """What the editors write: no "!", whole sentences only, the sign-off at the end."""
    text = output.strip().replace("!", ".")
    if "." in text:
        text = text[:text.rindex(".") + 1]
    return f"{text} Made to last, by {brand}."


def obeys(text: str, brand: str) -> bool:
    text = text.strip()
    return text.endswith(f"Made to last, by {brand}.") and "!" not in text


def generate(lm, rows: list[dict[str, str]]) -> list[str]:
    requests = [GenerationRequest(request_id=str(i), prompt_token_ids=lm.render_chat(product_messages(row)),
                                  params=SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
                for i, row in enumerate(rows)]
    return [lm.decode(result.token_ids) for result in lm.generate(requests)]


def dpo_lines(rows: list[dict[str, str]], outputs: list[str]) -> bytes:
    rated = [RatedLine(custom_id=row["sku"], line_number=i + 1, score=1, corrected=corrected(out, row["brand"]),
                       messages=product_messages(row), output=out)
             for i, (row, out) in enumerate(zip(rows, outputs, strict=True))]
    export = build_examples(rated, ExportFormat.DPO)
    assert len(export.examples) == len(rows), export.why_empty()
    return training_jsonl(export.examples)


def test_corrections_become_a_dpo_fine_tune_that_keeps_them():
    rows = list(csv.DictReader(CATALOG.open()))
    batch_rows, held_out = rows[:48], rows[-40:]
    checkpoint = read_checkpoint(bundled_gguf_path())
    base_state = fuse_projections(checkpoint.tensors, checkpoint.config)

    def served(state):
        return serve_checkpoint(checkpoint, state, device="cpu", dtype=torch.bfloat16, model_id="loop",
                                context_length=2048, engine_config=None)

    base = served(base_state)
    batch_outputs = generate(base, batch_rows)
    held_out_outputs = generate(base, held_out)
    base.loop.close()
    base_rate = sum(obeys(o, r["brand"]) for o, r in zip(held_out_outputs, held_out, strict=True)) / len(held_out)

    training = read_training_file(dpo_lines(batch_rows, batch_outputs).splitlines(), Method.DPO)
    data = prepare(training, checkpoint.tokenizer, checkpoint.chat_template, max_length=512, seed=0)
    held_pairs = prepare(read_training_file(dpo_lines(held_out, held_out_outputs).splitlines(), Method.DPO),
                         checkpoint.tokenizer, checkpoint.chat_template, max_length=512, seed=0)
    hyper = ResolvedHyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=0.5, beta=0.1)
    trainer = Trainer(build_model(checkpoint.config, base_state, torch.device("cpu"), torch.float32), data,
                      TrainerConfig(Method.DPO, hyper, LoraConfig(rank=8, alpha=16), seed=0, chosen_nll_weight=1.0))
    while not trainer.run_segment().finished:  # a segment ends at each epoch's end
        pass
    held = trainer.evaluate(held_pairs.train + held_pairs.validation)
    # reward margin = beta * ((pi_c - pi_r) after - (pi_c - pi_r) before): positive iff the margin rose
    assert held["valid_reward_margin"] > 0.5 and held["valid_reward_accuracy"] >= 0.9, held

    tuned = served(merge_into(base_state, trainer.adapters))
    tuned_outputs = generate(tuned, held_out)
    tuned.loop.close()
    tuned_rate = sum(obeys(o, r["brand"]) for o, r in zip(tuned_outputs, held_out, strict=True)) / len(held_out)
    assert tuned_rate - base_rate >= 0.30, (base_rate, tuned_rate, tuned_outputs[:5])

