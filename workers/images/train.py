"""Epoch loops for the image models: `VaeTrainer` and `GanTrainer` (seeded, Adam, per-epoch metrics,
resumable at epoch ends), and `train_vae` / `train_gan` that run one to the end.

Data order and every noise draw come from torch.Generators seeded from `config.seed`; parameters are
initialised under a forked global RNG seeded the same way, so a run is reproducible on one device.
`state_bytes()` after an epoch holds weights, optimizer moments and both generators' states, so a run
stopped there and resumed with `load_state_bytes` continues with the same batches and noise.
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

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


class Stopped(RuntimeError):
    """should_stop() said so in the middle of an epoch: the trainer's state is that epoch's partial one."""


StopCheck = Callable[[], bool]


class _EpochTrainer:
    """What both trainers share: seeded generators, the epoch counter, history, state round-trips."""

    architecture = ""

    def __init__(self, train: ImageDataset, valid: ImageDataset, config: TrainConfig) -> None:
        _check(train, config)
        self.train, self.valid, self.config = train, valid, config
        self.device = torch.device(config.device)
        self.order = torch.Generator().manual_seed(config.seed)
        self.noise = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []

    @property
    def finished(self) -> bool:
        return self.epoch >= self.config.n_epochs

    @property
    def sampler(self) -> torch.nn.Module:
        """The network images are drawn from (the VAE, the GAN's EMA generator)."""
        raise NotImplementedError

    def grid_png(self) -> bytes:
        """Samples from a fixed seed, one row per class: the epoch's picture of progress."""
        return sample_grid_png(self.sampler, GRID_COLUMNS, self.config.seed, self.device)

    def _modules(self) -> dict[str, Any]:
        raise NotImplementedError  # name -> object with state_dict / load_state_dict

    def state_bytes(self) -> bytes:
        state = {name: m.state_dict() for name, m in self._modules().items()}
        state |= {"epoch": self.epoch, "history": self.history, "order": self.order.get_state(),
                  "noise": self.noise.get_state()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        # On the CPU: generators take their state as a CPU ByteTensor whatever their device, and
        # load_state_dict copies weights (and optimizer moments) onto the parameters' device itself.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        for name, module in self._modules().items():
            module.load_state_dict(state[name])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.order.set_state(state["order"])
        self.noise.set_state(state["noise"])

    def run_epoch(self, should_stop: StopCheck | None = None) -> dict[str, float]:
        """Trains one epoch and returns its metrics (also appended to history); Stopped if told to stop."""
        metrics = {"epoch": float(self.epoch)} | self._epoch(should_stop or (lambda: False))
        self.history.append(metrics)
        self.epoch += 1
        return metrics

    def _epoch(self, should_stop: StopCheck) -> dict[str, float]:
        raise NotImplementedError


class VaeTrainer(_EpochTrainer):
    architecture = "vae"

    def __init__(self, train: ImageDataset, valid: ImageDataset, config: TrainConfig) -> None:
        super().__init__(train, valid, config)
        self.model = _build(config, lambda: ConditionalVae(config.image_size, train.channels, config.latent_dim,
                                                           train.num_classes, config.base_channels, config.sigma))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                          betas=config.adam_betas or (0.9, 0.999))
        self.pca_mse = PcaBaseline(train.images, config.latent_dim).reconstruction_error(valid.images)

    @property
    def sampler(self) -> torch.nn.Module:
        return self.model

    def _modules(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def _epoch(self, should_stop: StopCheck) -> dict[str, float]:
        config, train = self.config, self.train
        beta = config.beta * (min(1.0, (self.epoch + 1) / config.warmup_epochs) if config.warmup_epochs else 1.0)
        self.model.train()
        total, seen = 0.0, 0
        for index in _batches(len(train), config.batch_size, self.order):
            if should_stop():
                raise Stopped
            x, y = train.images[index].to(self.device), _labels(train, index, self.device)
            recon, kl = self.model.elbo_terms(x, y, generator=self.noise)
            loss = (recon + beta * kl).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, seen = total + loss.item() * len(index), seen + len(index)
        metrics = {"beta": beta, "train_loss": total / seen, "pca_recon_mse": self.pca_mse}
        return metrics | evaluate_vae(self.model, self.valid, seed=config.seed + 2, device=self.device)


EVAL_CHUNK = 1024  # validation images per forward pass (a large validation file must not exhaust memory)


def _chunks(dataset: ImageDataset, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(dataset.images[i : i + EVAL_CHUNK].to(device),
             None if dataset.labels is None else dataset.labels[i : i + EVAL_CHUNK].to(device))
            for i in range(0, len(dataset), EVAL_CHUNK)]


@torch.no_grad()
def evaluate_vae(model: ConditionalVae, dataset: ImageDataset, seed: int, device: torch.device) -> dict[str, float]:
    """valid_recon_mse (per pixel, through mu), valid_kl and valid_elbo (nats per image, beta = 1)."""
    model.eval()
    noise = torch.Generator(device=device).manual_seed(seed)
    squared = recon_sum = kl_sum = 0.0
    for x, y in _chunks(dataset, device):
        recon, kl = model.elbo_terms(x, y, generator=noise)
        recon_sum, kl_sum = recon_sum + float(recon.sum()), kl_sum + float(kl.sum())
        squared += float(((model.reconstruct(x, y) - x) ** 2).sum())
    n = len(dataset)
    return {"valid_recon_mse": squared / dataset.images.numel(), "valid_kl": kl_sum / n,
            "valid_elbo": -(recon_sum + kl_sum) / n}


class GanTrainer(_EpochTrainer):
    architecture = "gan"

    def __init__(self, train: ImageDataset, valid: ImageDataset, config: TrainConfig) -> None:
        super().__init__(train, valid, config)
        args = (config.image_size, train.channels)
        self.generator = _build(config, lambda: Generator(*args, config.latent_dim, train.num_classes,
                                                          config.base_channels))
        self.discriminator = _build(config, lambda: Discriminator(*args, train.num_classes, config.base_channels))
        betas = config.adam_betas or (0.0, 0.9)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=config.learning_rate, betas=betas)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=config.d_learning_rate or
                                      config.learning_rate, betas=betas)
        self.ema = EmaGenerator(self.generator, config.ema_decay)
        self.all_labels = _labels(train, None, self.device)

    @property
    def sampler(self) -> torch.nn.Module:
        return self.ema.model

    def _modules(self) -> dict[str, Any]:
        return {"generator": self.generator, "discriminator": self.discriminator, "ema": self.ema.model,
                "g_opt": self.g_opt, "d_opt": self.d_opt, "ema_steps": _Counter(self.ema)}

    def _epoch(self, should_stop: StopCheck) -> dict[str, float]:
        config, train, device = self.config, self.train, self.device
        generator, discriminator = self.generator, self.discriminator
        generator.train()
        discriminator.train()
        sums = {"d_loss": 0.0, "g_loss": 0.0, "d_acc_real": 0.0, "d_acc_fake": 0.0}
        steps = 0
        for index in _batches(len(train), config.batch_size, self.order):
            if should_stop():
                raise Stopped
            x, y = train.images[index].to(device), _labels(train, index, device)
            z = torch.randn(len(index), config.latent_dim, generator=self.noise, device=device)
            fake = generator(z, y)
            real_logits, fake_logits = discriminator(x, y), discriminator(fake.detach(), y)
            d_loss = discriminator_hinge_loss(real_logits, fake_logits)
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()

            g_loss = generator_hinge_loss(discriminator(fake, y))
            self.g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            self.g_opt.step()
            self.ema.update(generator)

            sums["d_loss"] += d_loss.item()
            sums["g_loss"] += g_loss.item()
            sums["d_acc_real"] += float((real_logits > 0).float().mean())
            sums["d_acc_fake"] += float((fake_logits < 0).float().mean())
            steps += 1
        metrics = {k: v / steps for k, v in sums.items()}
        refresh_batchnorm_stats(self.ema.model, self.all_labels, n_batches=8, batch_size=config.batch_size,
                                noise=self.noise)
        with torch.no_grad():
            discriminator.eval()
            real = sum(float((discriminator(x, y) > 0).sum()) for x, y in _chunks(self.valid, device))
            metrics["d_acc_valid_real"] = real / len(self.valid)
        return metrics


class _Counter:
    """The EMA's step count as a state_dict-able object (its ramp depends on it)."""

    def __init__(self, ema: EmaGenerator) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.ema.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.ema.steps = int(state["steps"])


def _run(trainer: _EpochTrainer, on_epoch: EpochCallback | None) -> None:
    while not trainer.finished:
        metrics = trainer.run_epoch()
        if on_epoch is not None:
            on_epoch(trainer.epoch - 1, metrics, trainer.grid_png())


def train_vae(
    train: ImageDataset, valid: ImageDataset, config: TrainConfig, on_epoch: EpochCallback | None = None
) -> VaeRun:
    """Train a (class-conditional when train has labels) VAE; history holds each epoch's validation metrics."""
    trainer = VaeTrainer(train, valid, config)
    _run(trainer, on_epoch)
    return VaeRun(trainer.model, trainer.history)


def train_gan(
    train: ImageDataset, valid: ImageDataset, config: TrainConfig, on_epoch: EpochCallback | None = None
) -> GanRun:
    """Train a (class-conditional when train has labels) DCGAN with hinge loss and a generator EMA."""
    trainer = GanTrainer(train, valid, config)
    _run(trainer, on_epoch)
    return GanRun(trainer.generator, trainer.ema.model, trainer.discriminator, trainer.history)
