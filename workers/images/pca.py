"""The PCA baseline for reconstruction: the best linear k-dimensional code of the training images.

Fitted on the flattened training images x in [-1, 1]^D (D = C * H * W). For an image x,
x_hat = mean + W^T W (x - mean) with W the k principal directions [k, D]; the error reported is
the mean squared error per pixel, mean_i ||x_i - x_hat_i||^2 / D, in the same [-1, 1] space as the VAE's.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA


class PcaBaseline:
    """PCA with k components on flattened images [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, k: int) -> None:
        flat = images.reshape(images.shape[0], -1).double().numpy()  # [N, D]
        k = min(k, flat.shape[0], flat.shape[1])
        self.k = k
        self.pca = PCA(n_components=k, svd_solver="full").fit(flat)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [N, C, H, W]: the projection of each image onto the k-dimensional principal subspace."""
        flat = images.reshape(images.shape[0], -1).double().numpy()
        recon = self.pca.inverse_transform(self.pca.transform(flat))
        return torch.from_numpy(np.asarray(recon, dtype=np.float32)).reshape(images.shape)

    def reconstruction_error(self, images: torch.Tensor) -> float:
        """Mean squared error per pixel of `reconstruct(images)` against images."""
        return float(((self.reconstruct(images) - images.float()) ** 2).mean())
