"""Seeded sampling from a trained image model, and PNG encoding.

A model here is anything with `latent_dim`, `num_classes` and `generate(z [B, latent_dim], y [B] | None)
-> [B, C, S, S] in [-1, 1]` (the VAE's decoder mean, the GAN's EMA generator). z ~ N(0, I) is drawn
from a torch.Generator seeded per call, never from the global RNG, so the same seed on the same
device gives the same bytes. Pixels: u = round((x + 1) * 127.5) clamped to 0..255, uint8 [N, S, S, C].
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image


class ImageModel(Protocol):
    latent_dim: int
    num_classes: int

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...


@torch.no_grad()
def sample_tensor(
    model: ImageModel, labels: Sequence[int] | torch.Tensor | int, seed: int, device: str | torch.device
) -> torch.Tensor:
    """float32 [N, C, S, S] in [-1, 1]; labels are N class ids, or a count N for an unconditional model."""
    device = torch.device(device)
    if isinstance(labels, int):
        if model.num_classes:
            raise ValueError("a class-conditional model needs a label per sample")
        n, y = labels, None
    else:
        y = torch.as_tensor(labels, dtype=torch.int64).to(device)
        n = int(y.shape[0])
        if not model.num_classes:
            raise ValueError("an unconditional model takes a sample count, not labels")
        if n and (int(y.min()) < 0 or int(y.max()) >= model.num_classes):
            raise ValueError(f"labels must lie in 0..{model.num_classes - 1}")
    noise = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=noise, device=device)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        return model.generate(z, y).float()
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, S, S, C] from float [N, C, S, S] in [-1, 1]."""
    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def sample(
    model: ImageModel, labels: Sequence[int] | torch.Tensor | int, seed: int, device: str | torch.device
) -> np.ndarray:
    """uint8 images [N, S, S, C] for the given labels (or count), reproducible bit for bit per seed and device."""
    return to_uint8(sample_tensor(model, labels, seed, device))


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 image [H, W, C] (C = 1: grayscale, C = 3: RGB) or [H, W]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_grid_png(model: ImageModel, per_row: int, seed: int, device: str | torch.device, padding: int = 1) -> bytes:
    """A PNG grid of samples: one row per class (one row for an unconditional model), per_row columns."""
    rows = max(model.num_classes, 1)
    labels: Sequence[int] | int = (
        [k for k in range(rows) for _ in range(per_row)] if model.num_classes else rows * per_row
    )
    images = sample(model, labels, seed, device)  # [rows * per_row, S, S, C]
    _, size, _, channels = images.shape
    step = size + padding
    grid = np.zeros((rows * step + padding, per_row * step + padding, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, per_row)
        grid[padding + r * step : padding + r * step + size, padding + c * step : padding + c * step + size] = image
    return to_png(grid)
