"""The trainer on the tiny model: it learns, segments resume bit for bit, epochs end segments, cancel, stop."""

from __future__ import annotations

import math

import pytest
import torch

from workers.fine_tuning.data import Method
from workers.fine_tuning.hyperparameters import (
    BASE_LEARNING_RATE,
    Hyperparameters,
    ResolvedHyperparameters,
    resolve_hyperparameters,
)
from workers.fine_tuning.lora import LoraConfig
from workers.fine_tuning.trainer import Trainer, TrainerConfig, learning_rate_at


def sft_config(**overrides) -> TrainerConfig:
    hyper = ResolvedHyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=5.0, beta=None)
    fields = dict(method=Method.SUPERVISED, hyperparameters=hyper, lora=LoraConfig(rank=4, alpha=8, dropout=0.1),
                  seed=3, log_every=1, row_tokens=128)
    return TrainerConfig(**(fields | overrides))


def dpo_config(**overrides) -> TrainerConfig:
    hyper = ResolvedHyperparameters(n_epochs=2, batch_size=3, learning_rate_multiplier=2.0, beta=0.1)
    fields = dict(method=Method.DPO, hyperparameters=hyper, lora=LoraConfig(rank=4, alpha=8, dropout=0.1), seed=5,
                  log_every=1, row_tokens=128)
    return TrainerConfig(**(fields | overrides))


def run_all(trainer: Trainer, **segment) -> list[dict]:
    metrics = []
    while True:
        result = trainer.run_segment(**segment)
        metrics += result.metrics
        if result.finished:
            return metrics


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in metrics]


def test_sft_learns_and_reports_openai_metric_names(tiny_lm, tiny_chats):
    trainer = Trainer(tiny_lm.model, tiny_chats, sft_config())
    before = trainer.evaluate()
    metrics = run_all(trainer)
    assert [m["step"] for m in metrics] == list(range(1, trainer.total_steps + 1))
    last = metrics[-1]
    assert {"train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss",
            "full_valid_mean_token_accuracy", "tokens_per_second", "learning_rate", "total_steps"} <= last.keys()
    assert last["full_valid_loss"] < 0.8 * before["valid_loss"]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert last["trained_tokens"] == 2 * tiny_chats.stats["train_tokens"]  # two epochs, no padding counted


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tiny_lm, tiny_chats, tiny_pairs, kind):
    data, config = (tiny_chats, sft_config()) if kind == "sft" else (tiny_pairs, dpo_config())
    straight = Trainer(tiny_lm.model, data, config)
    reference = without_timing(run_all(straight))

    first = Trainer(tiny_lm.model, data, config)
    resumed_metrics = first.run_segment(max_steps=3).metrics  # mid-epoch, dropout RNG and Adam moments in flight
    saved = first.state_bytes()
    del first  # the worker dies; another one picks the job up from the stored bytes
    second = Trainer(tiny_lm.model, data, config)
    second.load_state_bytes(saved)
    resumed_metrics += run_all(second, max_steps=2)
    assert without_timing(resumed_metrics) == reference
    a, b = straight.adapters.adapter_state_dict(), second.adapters.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segments_end_at_epochs_and_honour_limits(tiny_lm, tiny_chats):
    trainer = Trainer(tiny_lm.model, tiny_chats, sft_config())
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 8
    cancelled = trainer.run_segment(should_stop=lambda: True)
    assert cancelled.cancelled and cancelled.step == 0 and not cancelled.metrics
    one = trainer.run_segment(max_seconds=0)  # a segment always makes progress
    assert one.step == 1 and one.epoch_completed is None and not one.finished
    epoch = trainer.run_segment()  # stops at the epoch boundary even without limits
    assert (epoch.step, epoch.epoch_completed, epoch.finished) == (4, 1, False)
    assert "full_valid_loss" in epoch.metrics[-1]
    rest = trainer.run_segment()
    assert (rest.step, rest.epoch_completed, rest.finished) == (8, 2, True)
    again = trainer.run_segment()
    assert again.finished and not again.metrics and again.step == 8


def test_every_epoch_sees_every_example_once_in_a_seeded_order(tiny_lm, tiny_chats):
    trainer = Trainer(tiny_lm.model, tiny_chats, sft_config())
    n = len(tiny_chats.train)
    for epoch in range(2):
        seen = [i for s in range(epoch * 4, epoch * 4 + 4) for i in trainer.step_examples(s)]
        assert sorted(seen) == list(range(n))
    assert trainer.epoch_order(0) != trainer.epoch_order(1)
    assert Trainer(tiny_lm.model, tiny_chats, sft_config()).epoch_order(1) == trainer.epoch_order(1)


def test_row_capacity_changes_nothing_but_rounding(tiny_lm, tiny_chats):
    """Gradient accumulation over several rows is the same step as one row holding the whole batch (without
    dropout, whose masks are drawn row by row)."""
    lora = LoraConfig(rank=4, alpha=8)
    one_row = without_timing(run_all(Trainer(tiny_lm.model, tiny_chats, sft_config(row_tokens=512, lora=lora))))
    per_example = without_timing(run_all(Trainer(tiny_lm.model, tiny_chats, sft_config(row_tokens=64, lora=lora))))
    for a, b in zip(one_row, per_example, strict=True):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4), (a, b)


def test_early_stopping_after_patience_evaluations(tiny_lm, tiny_chats):
    class RisingValidation(Trainer):
        """Validation loss that only gets worse after the first pass."""

        passes = 0

        def _evaluate(self, examples, reference_keys):
            self.passes += 1
            return {"valid_loss": float(self.passes), "valid_mean_token_accuracy": 0.0}

    config = sft_config(hyperparameters=ResolvedHyperparameters(5, 4, 1.0, None), eval_every=1,
                        early_stopping_patience=2)
    trainer = RisingValidation(tiny_lm.model, tiny_chats, config)
    metrics = run_all(trainer)
    assert trainer.stopped_early and metrics[-1]["step"] == 3 and metrics[-1]["stopped_early"]
    resumed = RisingValidation(tiny_lm.model, tiny_chats, config)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.run_segment().finished and resumed.best_valid_loss == 1.0


def test_dpo_reference_is_the_base_model_and_rewards_separate(tiny_lm, tiny_pairs):
    trainer = Trainer(tiny_lm.model, tiny_pairs, dpo_config(hyperparameters=ResolvedHyperparameters(3, 3, 5.0, 0.1)))
    start = trainer.evaluate()
    # Fresh adapters (B = 0): the policy is the reference, so every margin is 0 and the loss log 2.
    assert start["valid_reward_margin"] == 0.0 and math.isclose(start["valid_loss"], math.log(2), rel_tol=1e-6)
    metrics = run_all(trainer)
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics[-1]["train_reward_accuracy"] == 1.0 and metrics[-1]["train_reward_margin"] > 0.5
    assert metrics[-1]["full_valid_loss"] < math.log(2)


def test_a_state_from_another_run_is_refused(tiny_lm, tiny_chats):
    trainer = Trainer(tiny_lm.model, tiny_chats, sft_config())
    trainer.run_segment(max_steps=1)
    other = Trainer(tiny_lm.model, tiny_chats, sft_config(seed=4))
    with pytest.raises(ValueError, match="another config"):
        other.load_state_bytes(trainer.state_bytes())


def test_learning_rate_warms_up_then_decays_by_cosine():
    rates = [learning_rate_at(s, 20, 1e-3, 0.1, 0.0) for s in range(20)]
    assert rates[:2] == [5e-4, 1e-3] and rates[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False)) and rates[-1] > 0
    assert rates[11] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))


def test_auto_hyperparameters_follow_the_documented_rules():
    auto = Hyperparameters()
    small = resolve_hyperparameters(auto, 20, "supervised")
    assert (small.n_epochs, small.batch_size, small.learning_rate_multiplier, small.beta) == (5, 1, 0.05, None)
    assert resolve_hyperparameters(auto, 216, Method.SUPERVISED).n_epochs == 3
    big = resolve_hyperparameters(auto, 20_000, Method.DPO)
    assert (big.n_epochs, big.batch_size, big.learning_rate_multiplier, big.beta) == (1, 40, 0.2, 0.1)
    asked = resolve_hyperparameters(Hyperparameters(n_epochs=2, batch_size=64, learning_rate_multiplier=0.5), 30,
                                    Method.SUPERVISED)
    assert (asked.n_epochs, asked.batch_size, asked.learning_rate) == (2, 30, 0.5 * BASE_LEARNING_RATE)
    assert asked.as_dict() == {"n_epochs": 2, "batch_size": 30, "learning_rate_multiplier": 0.5}
    for bad in (dict(n_epochs=0), dict(batch_size=257), dict(learning_rate_multiplier=0), dict(beta=2.5),
                dict(n_epochs=True)):
        with pytest.raises(ValueError):
            Hyperparameters(**bad)
