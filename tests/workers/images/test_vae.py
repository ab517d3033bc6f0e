"""Acceptance: the class-conditional VAE on digits beats PCA's reconstruction at the same latent size.

8 latent dimensions, 12 epochs of batches of 64 (about 6 s on one thread of a shared 2-core machine).
Measured: validation reconstruction MSE per pixel 0.038 against PCA's 0.098 (k = 8); validation ELBO
-303 nats per image after the first epoch, -57 after the last.
"""

from __future__ import annotations

import pytest

from workers.images.train import TrainConfig, train_vae

pytestmark = pytest.mark.slow


def test_vae_beats_pca_and_its_elbo_improves(digits, one_thread):
    train, valid = digits
    config = TrainConfig(
        n_epochs=12, batch_size=64, learning_rate=2e-3, image_size=8, latent_dim=8, warmup_epochs=5, seed=0
    )
    grids: list[bytes] = []
    run = train_vae(train, valid, config, on_epoch=lambda epoch, metrics, png: grids.append(png))
    first, last = run.history[0], run.history[-1]
    print(
        f"VAE valid MSE/pixel {last['valid_recon_mse']:.4f} vs PCA(k=8) {last['pca_recon_mse']:.4f}; "
        f"valid ELBO first {first['valid_elbo']:.1f} last {last['valid_elbo']:.1f}; KL {last['valid_kl']:.1f}"
    )
    assert len(run.history) == config.n_epochs and len(grids) == config.n_epochs
    assert grids[-1].startswith(b"\x89PNG")
    assert last["valid_recon_mse"] < last["pca_recon_mse"]
    assert last["valid_elbo"] > first["valid_elbo"]
