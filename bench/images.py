"""The image models (workers/images) on CPU: training and sampling throughput, and the acceptance tests' metrics,
on scikit-learn's bundled digits (1,797 8x8 grayscale images, 10 classes; no download).

    python bench/images.py [--vae-epochs 12] [--gan-epochs 40] [--samples 10000] [--batch 1000] [--threads 1]

The data are built as tests/workers/images/conftest.py builds them (npz bytes through read_npz at image_size 8,
split 80/20 by class with seed 0); each model is trained with its test's TrainConfig (test_vae.py, test_gan.py).

    train images/s        n_epochs * len(train) / seconds of train_vae / train_gan, given no on_epoch (so no
                          per-epoch sample grid). The VAE's seconds include its PCA baseline fit and a validation
                          pass per epoch; the GAN's include, per epoch, the EMA generator's BatchNorm refresh
                          (8 batches of 64 forwards) and the discriminator's pass over the validation split.
    sample images/s       sampling.sample(model, labels, seed, "cpu") -> uint8 [B, 8, 8, 1]: --samples images in
                          batches of --batch (the VAE: its decoder; the GAN: run.ema), after one untimed batch
    sample+PNG images/s   the same, plus to_png for each image, as a batch job that writes PNGs does
    VAE metrics           validation recon MSE per pixel (through the posterior mean) against PCA's (k = latent_dim,
                          fitted on the training split), their ratio; validation ELBO (nats per image), first and
                          last epoch
    GAN metrics           a probe (MLPClassifier, one hidden layer of 64) trained on the real training split: its
                          validation accuracy; the share of 100 EMA samples per class it labels as asked; diversity
                          (per class, mean pairwise L2 of samples / of the real training images; min over classes);
                          the Fréchet distance in the probe's hidden features, samples vs valid beside train vs valid

One torch thread by default: these tiny convolutions run faster on 1 thread than on 2 shared cores.
The last line reads `vae_mse_vs_pca=R gan_conditional_accuracy=A` (R = VAE MSE / PCA MSE; lower is better).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.images.data import ImageDataset, read_npz, split  # noqa: E402
from workers.images.metrics import frechet_distance  # noqa: E402
from workers.images.sampling import ImageModel, sample, sample_tensor, to_png  # noqa: E402
from workers.images.train import TrainConfig, train_gan, train_vae  # noqa: E402

PER_CLASS = 100  # conditional GAN samples per class, as test_gan.py draws


def digits() -> tuple[ImageDataset, ImageDataset]:
    """(train, valid): [N, 1, 8, 8] in [-1, 1], exactly as the tests' `digits` fixture builds them."""
    bunch = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, images=(bunch.images / 16.0).astype(np.float32), labels=bunch.target)
    return split(read_npz(buffer.getvalue(), image_size=8), valid_fraction=0.2, seed=0)


def vae_config(epochs: int) -> TrainConfig:
    """test_vae.py's config (latent 8, lr 2e-3, beta warm-up over 5 epochs)."""
    return TrainConfig(
        n_epochs=epochs, batch_size=64, learning_rate=2e-3, image_size=8, latent_dim=8, warmup_epochs=5, seed=0
    )


def gan_config(epochs: int) -> TrainConfig:
    """test_gan.py's config (latent 16, base 32 channels, lr 2e-4, Adam (0, 0.9) by default)."""
    return TrainConfig(
        n_epochs=epochs, batch_size=64, learning_rate=2e-4, image_size=8, latent_dim=16, base_channels=32, seed=0
    )


def timed_train(train_fn, train: ImageDataset, valid: ImageDataset, config: TrainConfig):
    """(run, seconds); no on_epoch, so no per-epoch sample grid."""
    started = time.perf_counter()
    run = train_fn(train, valid, config)
    return run, time.perf_counter() - started


def sampling_rates(model: ImageModel, n: int, batch: int) -> tuple[float, float]:
    """(images/s of sample() alone, images/s of sample() + to_png per image) over n images in batches."""
    labels = torch.arange(batch) % model.num_classes  # [batch], every class in turn
    sample(model, labels, 0, "cpu")  # warm-up: first-call allocations stay out of the timing
    batches = range(n // batch)
    started = time.perf_counter()
    for i in batches:
        sample(model, labels, i, "cpu")  # uint8 [batch, 8, 8, 1]
    bare = time.perf_counter() - started
    started = time.perf_counter()
    for i in batches:
        pngs = [to_png(image) for image in sample(model, labels, i, "cpu")]
    with_png = time.perf_counter() - started
    assert pngs[0].startswith(b"\x89PNG")
    done = len(batches) * batch
    return done / bare, done / with_png


def vae_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    first, last = history[0], history[-1]
    return {
        "mse": last["valid_recon_mse"],
        "pca_mse": last["pca_recon_mse"],
        "ratio": last["valid_recon_mse"] / last["pca_recon_mse"],
        "elbo_first": first["valid_elbo"],
        "elbo_last": last["valid_elbo"],
    }


def hidden_features(probe: MLPClassifier, flat: np.ndarray) -> np.ndarray:
    """The probe's hidden-layer activations, relu(x W_0 + b_0) [N, 64]."""
    return np.maximum(flat @ probe.coefs_[0] + probe.intercepts_[0], 0.0)


def mean_pairwise_distance(images: torch.Tensor) -> float:
    return float(torch.pdist(images.flatten(1).double()).mean())


def fit_probe(train: ImageDataset) -> MLPClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 300 iterations, as the test: close enough
        return MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(
            train.images.flatten(1).numpy(), train.labels.numpy()
        )


def gan_metrics(ema: ImageModel, probe: MLPClassifier, train: ImageDataset, valid: ImageDataset) -> dict[str, float]:
    """test_gan.py's measures: conditional accuracy, diversity ratios, Fréchet distances in probe features."""
    x_train, x_valid = train.images.flatten(1).numpy(), valid.images.flatten(1).numpy()  # [N, 64]
    asked = torch.arange(10).repeat_interleave(PER_CLASS)  # [1000]
    samples = sample_tensor(ema, asked, seed=1, device="cpu")  # float [1000, 1, 8, 8]
    flat = samples.flatten(1).numpy()
    ratios = [
        mean_pairwise_distance(samples[asked == k]) / mean_pairwise_distance(train.images[train.labels == k])
        for k in range(10)
    ]
    return {
        "probe_accuracy": probe.score(x_valid, valid.labels.numpy()),
        "conditional_accuracy": float((probe.predict(flat) == asked.numpy()).mean()),
        "diversity_min": min(ratios),
        "diversity_max": max(ratios),
        "fd_samples": frechet_distance(hidden_features(probe, flat), hidden_features(probe, x_valid)),
        "fd_real": frechet_distance(hidden_features(probe, x_train), hidden_features(probe, x_valid)),
    }


def print_throughput(rows: list[tuple[str, float, float, float, float]]) -> None:
    print("| model | train images/s | sample images/s | sample+PNG images/s | train seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, train_rate, sample_rate, png_rate, seconds in rows:
        print(f"| {name} | {train_rate:,.0f} | {sample_rate:,.0f} | {png_rate:,.0f} | {seconds:.1f} |")


def print_metrics(vae: dict[str, float], gan: dict[str, float], latent: int) -> None:
    rows = [
        ("VAE", "valid recon MSE per pixel", f"{vae['mse']:.4f}"),
        ("VAE", f"PCA (k = {latent}) recon MSE per pixel", f"{vae['pca_mse']:.4f}"),
        ("VAE", "VAE MSE / PCA MSE", f"{vae['ratio']:.3f}"),
        ("VAE", "valid ELBO (nats/image), first -> last epoch", f"{vae['elbo_first']:.1f} -> {vae['elbo_last']:.1f}"),
        ("GAN", "probe valid accuracy (real images)", f"{gan['probe_accuracy']:.3f}"),
        ("GAN", f"conditional accuracy ({PER_CLASS} samples per class)", f"{gan['conditional_accuracy']:.3f}"),
        ("GAN", "diversity ratio, min (max) over classes", f"{gan['diversity_min']:.2f} ({gan['diversity_max']:.2f})"),
        ("GAN", "Fréchet distance, samples vs valid (probe features)", f"{gan['fd_samples']:.2f}"),
        ("GAN", "Fréchet distance, train vs valid (probe features)", f"{gan['fd_real']:.2f}"),
    ]
    print("| model | metric | value |")
    print("| --- | --- | ---: |")
    for model, metric, value in rows:
        print(f"| {model} | {metric} | {value} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-epochs", type=int, default=12)
    parser.add_argument("--gan-epochs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=10_000, help="images per sampling measurement")
    parser.add_argument("--batch", type=int, default=1000, help="images per sample() call")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if not 0 < args.batch <= args.samples:
        parser.error("--batch must lie in 1..--samples")
    torch.set_num_threads(args.threads)
    train, valid = digits()
    print(f"digits: {len(train)} train / {len(valid)} valid images of 8x8x1, {train.num_classes} classes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); VAE {args.vae_epochs} epochs, "
          f"GAN {args.gan_epochs} epochs; sampling {args.samples} images in batches of {args.batch}")

    vae_cfg, gan_cfg = vae_config(args.vae_epochs), gan_config(args.gan_epochs)
    vae_run, vae_seconds = timed_train(train_vae, train, valid, vae_cfg)
    gan_run, gan_seconds = timed_train(train_gan, train, valid, gan_cfg)
    vae_rates = sampling_rates(vae_run.model, args.samples, args.batch)
    gan_rates = sampling_rates(gan_run.ema, args.samples, args.batch)
    vae = vae_metrics(vae_run.history)
    gan = gan_metrics(gan_run.ema, fit_probe(train), train, valid)

    print()
    print_throughput([
        ("VAE", vae_cfg.n_epochs * len(train) / vae_seconds, *vae_rates, vae_seconds),
        ("GAN (EMA generator)", gan_cfg.n_epochs * len(train) / gan_seconds, *gan_rates, gan_seconds),
    ])
    print()
    print_metrics(vae, gan, vae_cfg.latent_dim)
    print()
    print(f"vae_mse_vs_pca={vae['ratio']:.3f} gan_conditional_accuracy={gan['conditional_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
