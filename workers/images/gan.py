"""A class-conditional DCGAN for square images of 8, 16, 32 or 64 pixels in [-1, 1].

    generator G(z, y): concat(z [B, latent_dim], embed(y)) -> linear -> [B, 8b, 4, 4] ->
        (BatchNorm, ReLU, 4x4 stride-2 transposed conv) per doubling -> BatchNorm, ReLU, 3x3 conv -> tanh
    discriminator D(x, y): spectral-normalised convs (3x3 stem, then 4x4 stride 2 down to 4x4),
        LeakyReLU(0.2), h = sum over the 4x4 positions [B, F];
        logit = psi(h) + <embed(y), h>        (projection discriminator, Miyato & Koyama 2018)

Loss: hinge (Lim & Ye 2017; Miyato et al. 2018):
    L_D = E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y), y))],   L_G = -E[D(G(z, y), y)]
Sampling uses an exponential moving average of G's weights, theta_ema <- d theta_ema + (1 - d) theta with
d = min(decay, (1 + t) / (10 + t)) at step t (decay 0.999 by default; the ramp keeps the average from
remembering the random initialisation while t is small). The EMA copy's BatchNorm statistics are
recomputed from fresh batches (`refresh_batchnorm_stats`) before it is used, since averaged weights
do not match the live generator's running statistics. Unconditional when num_classes == 0.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from workers.images.shapes import stage_widths


class Generator(nn.Module):
    """G(z, y) -> images [B, C, S, S] in [-1, 1]."""

    def __init__(self, image_size: int, channels: int, latent_dim: int, num_classes: int, base_channels: int = 64):
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.latent_dim, self.num_classes = latent_dim, num_classes
        widths = stage_widths(image_size, base_channels)[::-1]  # 4x4 first
        embed_dim = latent_dim if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.project = nn.Linear(latent_dim + embed_dim, widths[0] * 16)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.BatchNorm2d(w_in), nn.ReLU(), nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1)]
        layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self._top_width = widths[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional generator needs labels")
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.body(self.project(z).view(-1, self._top_width, 4, 4))

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Images for latent draws z [B, latent_dim] (the sampling seam shared with the VAE)."""
        return self(z, y)


class Discriminator(nn.Module):
    """D(x, y) -> logits [B]; positive means "real"."""

    def __init__(self, image_size: int, channels: int, num_classes: int, base_channels: int = 64):
        super().__init__()
        widths = stage_widths(image_size, base_channels)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [spectral_norm(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers += [spectral_norm(nn.Conv2d(widths[-1], widths[-1], 3, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.psi = spectral_norm(nn.Linear(widths[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, widths[-1])) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.body(x).sum(dim=(2, 3))  # [B, F]
        logit = self.psi(h).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional discriminator needs labels")
            logit = logit + (self.embed(y) * h).sum(1)
        return logit


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    return torch.relu(1.0 - real_logits).mean() + torch.relu(1.0 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-E[D(fake)]."""
    return -fake_logits.mean()


class EmaGenerator:
    """An exponential moving average of a generator's parameters (buffers are refreshed, not averaged)."""

    def __init__(self, generator: Generator, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, generator: Generator) -> None:
        """theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + t) / (10 + t))."""
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for ema_p, p in zip(self.model.parameters(), generator.parameters(), strict=True):
            ema_p.lerp_(p, 1.0 - d)
        self.steps += 1


@torch.no_grad()
def refresh_batchnorm_stats(
    generator: Generator,
    labels: torch.Tensor | None,
    n_batches: int,
    batch_size: int,
    noise: torch.Generator,
) -> None:
    """Recompute every BatchNorm's running mean/var as the plain average over n_batches of fresh samples.

    labels: int64 [M] drawn from (the training labels' distribution) or None; the model is left in eval mode.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator.train()
    device = next(generator.parameters()).device
    for _ in range(n_batches):
        z = torch.randn(batch_size, generator.latent_dim, generator=noise, device=device)
        y = None
        if labels is not None:
            y = labels[torch.randint(len(labels), (batch_size,), generator=noise, device=labels.device)].to(device)
        generator(z, y)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    generator.eval()
