"""Fixtures for the image-model tests: scikit-learn's bundled digits (1,797 8x8 images, 10 classes), read
through read_npz and split 80/20 by class, and one torch thread while a test trains."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from workers.images.data import ImageDataset, read_npz, split


def digits_npz() -> bytes:
    """The digits as an uploadable .npz: float images in [0, 1] (pixel values 0..16 / 16) and labels."""
    bunch = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, images=(bunch.images / 16.0).astype(np.float32), labels=bunch.target)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def digits() -> tuple[ImageDataset, ImageDataset]:
    """(train, valid): digits as [N, 1, 8, 8] in [-1, 1] (pixel values 0..16 -> v / 8 - 1)."""
    return split(read_npz(digits_npz(), image_size=8), valid_fraction=0.2, seed=0)


@pytest.fixture
def one_thread():
    """Tiny convolutions on 2 shared cores run several times faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
