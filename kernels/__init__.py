"""Compute kernels: fused sampling and paged attention, with one dispatch point.

Each kernel file holds the @triton.jit kernels, a typed launcher, and the pure-torch reference that
is both the CPU path and the test oracle. `sample`, `prefill_attention` and `decode_attention` below
pick Triton on CUDA and the reference elsewhere (kernels.dispatch); `write_kv` is torch indexing.
kernels/ knows nothing of jobs, models or tokenizers; it imports torch, and triton only when installed.
`python -m kernels.aot` compiles every kernel for sm_90/sm_80 without a GPU.
"""

from kernels.dispatch import decode_attention, prefill_attention, sample, write_kv
from kernels.sampling import SamplingMetadata

__all__ = ["SamplingMetadata", "decode_attention", "prefill_attention", "sample", "write_kv"]
