"""The resolution ladder both models share: image_size in {8, 16, 32, 64} <-> stride-2 stages to 4x4.

A stage halves (encoder, discriminator) or doubles (decoder, generator) the side; there are
log2(image_size / 4) of them, and the channels at the k-th resolution below image_size are
base * min(2^k, 8).
"""

from __future__ import annotations

import math

SUPPORTED_SIZES = (8, 16, 32, 64)


def n_downsamples(image_size: int) -> int:
    """log2(image_size / 4): the stride-2 stages between image_size and 4x4."""
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_SIZES}, got {image_size}")
    return int(math.log2(image_size // 4))


def stage_widths(image_size: int, base_channels: int) -> list[int]:
    """Channels at each resolution from image_size down to 4x4: base, 2 base, ... (capped at 8 base)."""
    return [base_channels * min(2**i, 8) for i in range(n_downsamples(image_size) + 1)]
