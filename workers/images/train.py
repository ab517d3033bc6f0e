"""Epoch loops for the image models: `train_vae` and `train_gan`, seeded, Adam, per-epoch metrics.

Data order and every noise draw come from torch.Generators seeded from `config.seed`; parameters are
initialised under a forked global RNG seeded the same way, so a run is reproducible on one device.
VAE: loss per image = recon + beta_e * kl, beta_e = beta * min(1, (e + 1) / warmup_epochs) at epoch e
(0-based; no warm-up when warmup_epochs == 0). Its metrics, on the validation split after each epoch:
    valid_recon_mse  mean squared error per pixel of reconstruct(x) (posterior mean), in [-1, 1] units
    pca_recon_mse    the same for PCA with k = latent_dim fitted on the training split (the linear baseline)
    valid_kl, valid_elbo   nats per image, ELBO = -(recon + kl) at beta = 1, one seeded z draw per image
GAN (hinge loss, gan.py): train-epoch means of d_loss and g_loss, and the discriminator's accuracy on
real (D > 0) and fake (D < 0) batches; d_acc_valid_real on the validation images.
`on_epoch(epoch, metrics, grid_png)` gets a PNG of samples, one row per class, from a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers.images.data import ImageDataset
from workers.images.gan import (
    Discriminator,
    EmaGenerator,
    Generator,
    discriminator_hinge_loss,
    generator_hinge_loss,
    refresh_batchnorm_stats,
)
from workers.images.pca import PcaBaseline
from workers.images.sampling import sample_grid_png
from workers.images.vae import ConditionalVae

EpochCallback = Callable[[int, dict[str, float], bytes], None]
GRID_COLUMNS = 10


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (fields used by one model only are marked)."""

    n_epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-4
    image_size: int = 32  # 8, 16, 32 or 64; must equal the dataset's
    latent_dim: int = 16
    beta: float = 1.0  # VAE: weight of the KL term
    warmup_epochs: int = 0  # VAE: beta ramps linearly over these epochs
    seed: int = 0
    base_channels: int = 32  # channels at full resolution (a multiple of 8); doubled per halving, capped at 8x
    sigma: float = 0.1  # VAE: the fixed standard deviation of the Gaussian likelihood
    ema_decay: float = 0.999  # GAN: the generator EMA's decay
    adam_betas: tuple[float, float] | None = None  # None: (0.9, 0.999) for the VAE, (0.0, 0.9) for the GAN
    d_learning_rate: float | None = None  # GAN: the discriminator's rate (None: learning_rate)
    device: str = "cpu"


@dataclass
class VaeRun:
    model: ConditionalVae
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per epoch


@dataclass
class GanRun:
    generator: Generator  # the live generator (train mode weights)
    ema: Generator  # the averaged generator, BatchNorm statistics refreshed: sample from this one
    discriminator: Discriminator
    history: list[dict[str, float]] = field(default_factory=list)


def _check(train: ImageDataset, config: TrainConfig) -> None:
    if train.image_size != config.image_size:
        raise ValueError(f"the dataset's images are {train.image_size} pixels, the config says {config.image_size}")


def _batches(n: int, batch_size: int, order: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=order)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _labels(dataset: ImageDataset, index: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if dataset.labels is None:
        return None
    return (dataset.labels if index is None else dataset.labels[index]).to(device)


def _build(config: TrainConfig, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return make().to(config.device)


def train_vae(
    train: ImageDataset, valid: ImageDataset, config: TrainConfig, on_epoch: EpochCallback | None = None
) -> VaeRun:
    """Train a (class-conditional when train has labels) VAE; history holds each epoch's validation metrics."""
    _check(train, config)
    device = torch.device(config.device)
    model = _build(
        config,
        lambda: ConditionalVae(
            config.image_size, train.channels, config.latent_dim, train.num_classes, config.base_channels, config.sigma
        ),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=config.adam_betas or (0.9, 0.999))
    order = torch.Generator().manual_seed(config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    pca_mse = PcaBaseline(train.images, config.latent_dim).reconstruction_error(valid.images)
    run = VaeRun(model)
    for epoch in range(config.n_epochs):
        beta = config.beta * (min(1.0, (epoch + 1) / config.warmup_epochs) if config.warmup_epochs else 1.0)
        model.train()
        total, seen = 0.0, 0
        for index in _batches(len(train), config.batch_size, order):
            x, y = train.images[index].to(device), _labels(train, index, device)
            recon, kl = model.elbo_terms(x, y, generator=noise)
            loss = (recon + beta * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(index), seen + len(index)
        metrics = {"epoch": float(epoch), "beta": beta, "train_loss": total / seen, "pca_recon_mse": pca_mse}
        metrics.update(evaluate_vae(model, valid, seed=config.seed + 2, device=device))
        run.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, sample_grid_png(model, GRID_COLUMNS, config.seed, device))
    return run


@torch.no_grad()
def evaluate_vae(model: ConditionalVae, dataset: ImageDataset, seed: int, device: torch.device) -> dict[str, float]:
    """valid_recon_mse (per pixel, through mu), valid_kl and valid_elbo (nats per image, beta = 1)."""
    model.eval()
    noise = torch.Generator(device=device).manual_seed(seed)
    x, y = dataset.images.to(device), _labels(dataset, None, device)
    recon, kl = model.elbo_terms(x, y, generator=noise)
    mse = float(((model.reconstruct(x, y) - x) ** 2).mean())
    return {"valid_recon_mse": mse, "valid_kl": float(kl.mean()), "valid_elbo": float(-(recon + kl).mean())}


def train_gan(
    train: ImageDataset, valid: ImageDataset, config: TrainConfig, on_epoch: EpochCallback | None = None
) -> GanRun:
    """Train a (class-conditional when train has labels) DCGAN with hinge loss and a generator EMA."""
    _check(train, config)
    device = torch.device(config.device)
    args = (config.image_size, train.channels)
    generator = _build(config, lambda: Generator(*args, config.latent_dim, train.num_classes, config.base_channels))
    discriminator = _build(config, lambda: Discriminator(*args, train.num_classes, config.base_channels))
    betas = config.adam_betas or (0.0, 0.9)
    g_opt = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=betas)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=config.d_learning_rate or config.learning_rate, betas=betas)
    ema = EmaGenerator(generator, config.ema_decay)
    order = torch.Generator().manual_seed(config.seed)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    all_labels = _labels(train, None, device)
    run = GanRun(generator, ema.model, discriminator)
    for epoch in range(config.n_epochs):
        generator.train()
        discriminator.train()
        sums = {"d_loss": 0.0, "g_loss": 0.0, "d_acc_real": 0.0, "d_acc_fake": 0.0}
        steps = 0
        for index in _batches(len(train), config.batch_size, order):
            x, y = train.images[index].to(device), _labels(train, index, device)
            z = torch.randn(len(index), config.latent_dim, generator=noise, device=device)
            fake = generator(z, y)
            real_logits, fake_logits = discriminator(x, y), discriminator(fake.detach(), y)
            d_loss = discriminator_hinge_loss(real_logits, fake_logits)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()

            g_loss = generator_hinge_loss(discriminator(fake, y))
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
            ema.update(generator)

            sums["d_loss"] += d_loss.item()
            sums["g_loss"] += g_loss.item()
            sums["d_acc_real"] += float((real_logits > 0).float().mean())
            sums["d_acc_fake"] += float((fake_logits < 0).float().mean())
            steps += 1
        metrics = {"epoch": float(epoch), **{k: v / steps for k, v in sums.items()}}
        refresh_batchnorm_stats(ema.model, all_labels, n_batches=8, batch_size=config.batch_size, noise=noise)
        with torch.no_grad():
            discriminator.eval()
            valid_logits = discriminator(valid.images.to(device), _labels(valid, None, device))
            metrics["d_acc_valid_real"] = float((valid_logits > 0).float().mean())
        run.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, sample_grid_png(ema.model, GRID_COLUMNS, config.seed, device))
    return run
