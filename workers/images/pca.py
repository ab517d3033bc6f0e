"""The PCA baseline for reconstruction: the best linear k-dimensional code of the training images.

Fitted on the flattened training images x in [-1, 1]^D (D = C * H * W). For an image x,
x_hat = mean + W^T W (x - mean) with W the k principal directions [k, D]; the error reported is
the mean squared error per pixel, mean_i ||x_i - x_hat_i||^2 / D, in the same [-1, 1] space as the VAE's.
A large training set is fitted on a seeded sample of MAX_FIT_IMAGES images, with the randomized SVD
once the matrix passes MAX_FULL_SVD entries (a full SVD of [100k, 12288] would take minutes and gigabytes).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA

MAX_FIT_IMAGES = 10_000
MAX_FULL_SVD = 20_000_000  # entries of the fitted matrix


class PcaBaseline:
    """PCA with k components on flattened images [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, k: int) -> None:
        flat = images.reshape(images.shape[0], -1).double().numpy()  # [N, D]
        if flat.shape[0] > MAX_FIT_IMAGES:
            flat = flat[np.random.default_rng(0).choice(flat.shape[0], MAX_FIT_IMAGES, replace=False)]
        k = min(k, flat.shape[0], flat.shape[1])
        self.k = k
        solver = "full" if flat.size <= MAX_FULL_SVD else "randomized"
        self.pca = PCA(n_components=k, svd_solver=solver, random_state=0).fit(flat)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [N, C, H, W]: the projection of each image onto the k-dimensional principal subspace."""
        flat = images.reshape(images.shape[0], -1).double().numpy()
        recon = self.pca.inverse_transform(self.pca.transform(flat))
        return torch.from_numpy(np.asarray(recon, dtype=np.float32)).reshape(images.shape)

    def reconstruction_error(self, images: torch.Tensor) -> float:
        """Mean squared error per pixel of `reconstruct(images)` against images (1024 images at a time)."""
        squared = sum(float(((self.reconstruct(chunk) - chunk.float()) ** 2).sum()) for chunk in images.split(1024))
        return squared / images.numel()
