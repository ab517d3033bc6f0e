"""An image fine-tune's hyperparameters (method.gan|vae.hyperparameters), "auto" resolved. Torch-free.

Rules for "auto" (n = training images after the validation split, S = image_size):
  n_epochs                  GAN: 60,000 images seen (about 40 epochs of the 1,437 digits the acceptance
                            trains on), VAE: 20,000; clamped to 5..100 epochs.
  batch_size                64, at most n.
  learning_rate_multiplier  1: the learning rate is 2e-4 for the GAN (both networks, Adam betas 0, 0.9,
                            the usual DCGAN/SN-GAN rate) and 2e-3 for the VAE.
  image_size                the dataset's side when it is one of 8, 16, 32, 64, else the largest of those
                            below it (at least 8); a zip of pictures of any size: 32.
  latent_dim                GAN 16 at 8x8, 32 at 16, 64 at 32, 128 at 64; VAE S (8 at 8x8, ...).
  beta (VAE)                1 (the ELBO); the KL weight ramps up over the first min(5, n_epochs // 2) epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

AUTO = "auto"
SUPPORTED_SIZES = (8, 16, 32, 64)  # workers/images/shapes.py's ladder (that module needs no torch either)
BASE_LEARNING_RATE = {"gan": 2e-4, "vae": 2e-3}
IMAGES_SEEN = {"gan": 60_000, "vae": 20_000}
ZIP_DEFAULT_SIZE = 32
BASE_CHANNELS = 32
Auto = Literal["auto"]


@dataclass(frozen=True)
class ImageHyperparameters:
    """What a job asks for; each field may be "auto"."""

    n_epochs: int | Auto = AUTO  # 1..200
    batch_size: int | Auto = AUTO  # 1..1024
    learning_rate_multiplier: float | Auto = AUTO  # > 0
    image_size: int | Auto = AUTO  # 8, 16, 32 or 64
    latent_dim: int | Auto = AUTO  # 2..512
    beta: float | Auto = AUTO  # VAE only: > 0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, bool) or not ok):
                raise ValueError(f"hyperparameters.{name} must be \"auto\" or {rule}, got {value!r}")

        def integer_in(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and low <= value <= high

        check("n_epochs", integer_in(self.n_epochs, 1, 200), "an integer in [1, 200]")
        check("batch_size", integer_in(self.batch_size, 1, 1024), "an integer in [1, 1024]")
        lr = self.learning_rate_multiplier
        check("learning_rate_multiplier", isinstance(lr, int | float) and 0 < lr <= 100, "a number in (0, 100]")
        check("image_size", self.image_size in SUPPORTED_SIZES, f"one of {', '.join(map(str, SUPPORTED_SIZES))}")
        check("latent_dim", integer_in(self.latent_dim, 2, 512), "an integer in [2, 512]")
        check("beta", isinstance(self.beta, int | float) and 0 < self.beta <= 100, "a number in (0, 100]")


@dataclass(frozen=True)
class ResolvedImageHyperparameters:
    architecture: str  # "gan" or "vae"
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    image_size: int
    latent_dim: int
    beta: float | None  # VAE only
    warmup_epochs: int  # VAE only (0 for the GAN)

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_multiplier * BASE_LEARNING_RATE[self.architecture]

    def as_dict(self) -> dict[str, Any]:
        """What the job reports as its hyperparameters."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("architecture", "warmup_epochs")}


def auto_image_size(native_side: int | None) -> int:
    """The model size for images native_side pixels on their shorter side (None: unknown, a zip)."""
    if native_side is None:
        return ZIP_DEFAULT_SIZE
    return max([size for size in SUPPORTED_SIZES if size <= native_side] or [SUPPORTED_SIZES[0]])


def resolve_image_hyperparameters(requested: ImageHyperparameters, architecture: str, *, n_images: int,
                                  image_size: int) -> ResolvedImageHyperparameters:
    """requested with "auto" resolved for n_images training images of image_size (already chosen)."""
    n_epochs = (max(5, min(100, IMAGES_SEEN[architecture] // max(1, n_images))) if requested.n_epochs == AUTO
                else int(requested.n_epochs))
    batch_size = 64 if requested.batch_size == AUTO else int(requested.batch_size)
    lr = 1.0 if requested.learning_rate_multiplier == AUTO else float(requested.learning_rate_multiplier)
    if requested.latent_dim != AUTO:
        latent = int(requested.latent_dim)
    else:
        latent = image_size if architecture == "vae" else 2 * image_size
    vae = architecture == "vae"
    beta = (1.0 if requested.beta == AUTO else float(requested.beta)) if vae else None
    return ResolvedImageHyperparameters(architecture=architecture, n_epochs=n_epochs,
                                        batch_size=max(1, min(batch_size, n_images)), learning_rate_multiplier=lr,
                                        image_size=image_size, latent_dim=latent, beta=beta,
                                        warmup_epochs=min(5, n_epochs // 2) if vae else 0)
