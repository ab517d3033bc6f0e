"""A class-conditional convolutional VAE for square images of 8, 16, 32 or 64 pixels in [-1, 1].

    encoder q(z | x, y) = N(mu, diag(exp(logvar))): x [B, C, S, S] -> stride-2 convs down to 4x4 ->
            flatten, concat embed(y) -> (mu, logvar) [B, latent_dim]
    z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)                     (reparameterisation)
    decoder p(x | z, y) = N(x_hat, sigma^2 I): concat(z, embed(y)) -> 4x4 -> stride-2 transposed convs ->
            x_hat = tanh(.) [B, C, S, S]

Likelihood: Gaussian with a fixed sigma (default 0.1), so per image, with D = C * S * S pixels,
    recon = -log p(x | z, y) = ||x - x_hat||^2 / (2 sigma^2) + (D / 2) log(2 pi sigma^2)
    kl    = KL(q(z | x, y) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)
    ELBO  = -(recon + kl)  (nats per image);  training loss = recon + beta * kl
with beta optionally warmed up from 0 (see train.py). Unconditional when num_classes == 0 (no embedding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.images.shapes import stage_widths


class ConditionalVae(nn.Module):
    """q(z | x, y) and p(x | z, y) as convolutional networks; label y in 0..num_classes-1 or None."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int,
        num_classes: int,
        base_channels: int = 32,
        sigma: float = 0.1,
    ) -> None:
        super().__init__()
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        self.num_classes, self.sigma = num_classes, sigma
        widths = stage_widths(image_size, base_channels)
        embed_dim = 16 if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None

        down: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            down += [nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), nn.GroupNorm(8, w_out), nn.SiLU()]
        self.encoder = nn.Sequential(*down)
        features = widths[-1] * 16  # [B, w, 4, 4] flattened
        self.to_posterior = nn.Sequential(
            nn.Linear(features + embed_dim, 256), nn.SiLU(), nn.Linear(256, 2 * latent_dim)
        )

        self.from_latent = nn.Sequential(nn.Linear(latent_dim + embed_dim, 256), nn.SiLU(), nn.Linear(256, features))
        up: list[nn.Module] = []
        rev = widths[::-1]
        for w_in, w_out in zip(rev[:-1], rev[1:], strict=True):
            up += [nn.GroupNorm(8, w_in), nn.SiLU(), nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1)]
        up += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1), nn.Tanh()]
        self.decoder = nn.Sequential(*up)
        self._top_width = widths[-1]

    def _condition(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return h
        if y is None:
            raise ValueError("a class-conditional VAE needs labels")
        return torch.cat([h, self.embed(y)], dim=1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each [B, latent_dim], of q(z | x, y) for x [B, C, S, S]."""
        h = self.encoder(x).flatten(1)
        mu, logvar = self.to_posterior(self._condition(h, y)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """x_hat [B, C, S, S] in [-1, 1]: the mean of p(x | z, y)."""
        h = self.from_latent(self._condition(z, y)).view(-1, self._top_width, 4, 4)
        return self.decoder(h)

    def decode_between(self, z: torch.Tensor, a: int, b: int, t: torch.Tensor) -> torch.Tensor:
        """x_hat [T, C, S, S] for one z [1, latent_dim] under the class embedding (1 - t) e_a + t e_b, t [T]."""
        if self.embed is None:
            raise ValueError("interpolating between classes needs a class-conditional VAE")
        ends = self.embed(torch.tensor([a, b], device=z.device))
        mixed = torch.lerp(ends[0], ends[1], t[:, None])  # [T, embed_dim]
        h = self.from_latent(torch.cat([z.expand(len(t), -1), mixed], dim=1)).view(-1, self._top_width, 4, 4)
        return self.decoder(h)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Samples' means for prior draws z [B, latent_dim] (the sampling seam shared with the GAN)."""
        return self.decode(z, y)

    def elbo_terms(
        self, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl), each [B] in nats per image, for one reparameterised draw of z (noise from generator)."""
        mu, logvar = self.encode(x, y)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        x_hat = self.decode(mu + torch.exp(0.5 * logvar) * eps, y)
        pixels = x[0].numel()
        squared = ((x - x_hat) ** 2).flatten(1).sum(1)
        recon = squared / (2 * self.sigma**2) + 0.5 * pixels * math.log(2 * math.pi * self.sigma**2)
        kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(1)
        return recon, kl

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """decode(mu(x, y), y) [B, C, S, S]: the deterministic reconstruction through the posterior mean."""
        mu, _ = self.encode(x, y)
        return self.decode(mu, y)
