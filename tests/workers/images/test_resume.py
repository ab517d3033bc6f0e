"""A trainer stopped at an epoch end and resumed from its state bytes continues exactly as one that never stopped."""

from __future__ import annotations

import pytest
import torch

from workers.images.train import GanTrainer, Stopped, TrainConfig, VaeTrainer

CONFIG = dict(n_epochs=2, batch_size=64, image_size=8, latent_dim=8, base_channels=16, seed=3)


@pytest.mark.parametrize("trainer_class", [VaeTrainer, GanTrainer])
def test_resumed_run_matches_the_uninterrupted_one(digits, one_thread, trainer_class):
    train, valid = digits
    straight = trainer_class(train, valid, TrainConfig(**CONFIG))
    straight.run_epoch()
    straight.run_epoch()

    first = trainer_class(train, valid, TrainConfig(**CONFIG))
    first.run_epoch()
    saved = first.state_bytes()
    resumed = trainer_class(train, valid, TrainConfig(**CONFIG))
    resumed.load_state_bytes(saved)
    assert resumed.epoch == 1 and not resumed.finished
    resumed.run_epoch()

    assert resumed.finished and resumed.history == straight.history
    for a, b in zip(straight.sampler.state_dict().values(), resumed.sampler.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.grid_png() == straight.grid_png()


def test_should_stop_interrupts_an_epoch(digits, one_thread):
    train, valid = digits
    trainer = VaeTrainer(train, valid, TrainConfig(**CONFIG))
    calls = []
    with pytest.raises(Stopped):
        trainer.run_epoch(should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert trainer.epoch == 0 and trainer.history == []
