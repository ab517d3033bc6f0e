"""A trained image model as two files in storage, and back: what a job publishes and a batch samples.

    model.json          the card: architecture ("gan" | "vae"), image_size, channels, latent_dim,
                        class_names ([] when unconditional), base_channels, sigma
    model.safetensors   the sampling network's weights: the VAE, or the GAN's EMA generator (BatchNorm
                        statistics refreshed); the discriminator and optimizer stay in the training state

The card is also the model row's image_spec in SQL, so the API checks an image line's size and prompt
without reading storage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from workers.images.gan import Generator
from workers.images.vae import ConditionalVae

MODEL_CARD_FILE = "model.json"
MODEL_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ImageModelCard:
    architecture: str  # "gan" or "vae"
    image_size: int  # 8, 16, 32 or 64
    channels: int  # 1 (grayscale) or 3 (RGB)
    latent_dim: int
    class_names: list[str]  # label k is class_names[k]; [] for an unconditional model
    base_channels: int
    sigma: float = 0.1  # VAE only

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageModelCard:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def build_network(card: ImageModelCard) -> torch.nn.Module:
    """An untrained network of the card's shape (weights to be loaded)."""
    if card.architecture == "vae":
        return ConditionalVae(card.image_size, card.channels, card.latent_dim, card.num_classes, card.base_channels,
                              card.sigma)
    if card.architecture == "gan":
        return Generator(card.image_size, card.channels, card.latent_dim, card.num_classes, card.base_channels)
    raise ValueError(f"unknown image architecture {card.architecture!r}")


def model_files(card: ImageModelCard, network: torch.nn.Module) -> dict[str, bytes]:
    """{file name: bytes} to store under the model's prefix."""
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    return {MODEL_CARD_FILE: json.dumps(card.as_dict(), sort_keys=True).encode(),
            MODEL_WEIGHTS_FILE: save_safetensors(weights)}


def load_network(files: dict[str, bytes], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ImageModelCard]:
    """(the network in eval mode on device, its card) from model_files' output."""
    card = ImageModelCard.from_dict(json.loads(files[MODEL_CARD_FILE]))
    network = build_network(card)
    network.load_state_dict(load_safetensors(files[MODEL_WEIGHTS_FILE]))
    return network.to(device).eval().requires_grad_(False), card
