"""Seeded sampling: the same seed gives the same bytes, another seed other bytes; PNGs decode back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from workers.images.gan import Generator
from workers.images.sampling import sample, sample_grid_png, to_png
from workers.images.vae import ConditionalVae


def models():
    torch.manual_seed(0)
    return [
        Generator(image_size=16, channels=3, latent_dim=8, num_classes=4, base_channels=8),
        ConditionalVae(image_size=8, channels=1, latent_dim=4, num_classes=3, base_channels=8),
    ]


@pytest.mark.parametrize("model", models(), ids=["gan", "vae"])
def test_same_seed_same_bytes_other_seed_other_bytes(model):
    labels = [0, 1, 2, 2, 1]
    first, again = sample(model, labels, seed=5, device="cpu"), sample(model, labels, seed=5, device="cpu")
    other = sample(model, labels, seed=6, device="cpu")
    assert first.dtype == np.uint8 and first.shape == (5, model.image_size, model.image_size, model.channels)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert to_png(first[0]) == to_png(again[0])


def test_sampling_ignores_the_global_rng():
    model = models()[0]
    torch.manual_seed(1)
    first = sample(model, [3, 3], seed=0, device="cpu")
    torch.manual_seed(2)
    assert sample(model, [3, 3], seed=0, device="cpu").tobytes() == first.tobytes()


def test_unconditional_model_takes_a_count_and_conditional_needs_labels():
    torch.manual_seed(0)
    unconditional = Generator(image_size=8, channels=1, latent_dim=4, num_classes=0, base_channels=8)
    assert sample(unconditional, 3, seed=0, device="cpu").shape == (3, 8, 8, 1)
    with pytest.raises(ValueError):
        sample(models()[0], 3, seed=0, device="cpu")
    with pytest.raises(ValueError):
        sample(models()[0], [4], seed=0, device="cpu")


def test_png_and_grid_decode_to_the_pixels():
    model = models()[0]
    image = sample(model, [1], seed=0, device="cpu")[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(to_png(image)))), image)
    grid = Image.open(io.BytesIO(sample_grid_png(model, per_row=5, seed=0, device="cpu")))
    assert grid.size == (5 * 17 + 1, 4 * 17 + 1) and grid.mode == "RGB"
