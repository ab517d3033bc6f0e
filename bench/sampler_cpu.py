"""The CPU sampler's Gumbel draw: noise on every finite entry (the old way) against noise only where a
token could still win (kernels.sampling._gumbel_argmax_reference), on the bundled model's own logits.

    python bench/sampler_cpu.py [--rows 32] [--temperature 0.7] [--steps 20]

The logits are recorded (by a logits processor) while the bundled SmolLM2 writes --rows catalog
descriptions for --steps tokens, then scaled by 1/temperature with no top-p, so every entry of the
49k vocabulary is finite: the case where the old way drew a Philox number for each. Both ways must
pick the same tokens; the last line reads `speedup=...`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.sampling import _gumbel_argmax_reference, _gumbel_reference  # noqa: E402


def every_entry(x: torch.Tensor, row_key: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.isfinite(x).nonzero(as_tuple=True)
    scores = torch.full_like(x, float("-inf"))
    scores[rows, cols] = x[rows, cols] + _gumbel_reference(row_key[rows], cols)
    return torch.argmax(scores, dim=-1)


def timed(fn, x, keys, steps: int) -> tuple[float, list[torch.Tensor]]:
    started, out = time.perf_counter(), []
    for step in range(steps):
        out.append(fn(x[step], keys + step))
    return (time.perf_counter() - started) / steps, out


def recorded_logits(rows: int, steps: int) -> torch.Tensor:
    """[steps, rows, V] fp32 logits of the bundled model writing rows product descriptions."""
    from genq.settings import get_settings
    from workers.registry import BUNDLED_MODEL_ID
    from workers.runtime.loader import load_registered_model
    from workers.runtime.types import GenerationRequest, SamplingParams

    lm = load_registered_model(BUNDLED_MODEL_ID, get_settings())
    seen: dict[int, list[torch.Tensor]] = {}

    def recorder(row: int):
        return lambda tokens, logits: seen.setdefault(row, []).append(logits.float().clone())

    lines = [line for line in (Path(__file__).resolve().parents[1] / "examples/catalog_sample.csv")
             .read_text().splitlines()[1:rows + 1]]
    lm.generate([GenerationRequest(request_id=f"r{i}", prompt_token_ids=lm.render_chat(
        [{"role": "user", "content": f"Describe this product: {line}"}]),
        params=SamplingParams(temperature=0.7, seed=i, max_tokens=steps, ignore_eos=True),
        logits_processors=[recorder(i)]) for i, line in enumerate(lines)])
    return torch.stack([torch.stack(seen[i][:steps]) for i in range(rows)], dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    x = recorded_logits(args.rows, args.steps) / args.temperature
    keys = torch.arange(args.rows, dtype=torch.int64) * 7919 + 1
    old, old_tokens = timed(every_entry, x, keys, args.steps)
    new, new_tokens = timed(_gumbel_argmax_reference, x, keys, args.steps)
    same = all(torch.equal(a, b) for a, b in zip(old_tokens, new_tokens, strict=True))
    print(f"{args.rows} rows x {x.shape[-1]} entries of the bundled model's logits, temperature "
          f"{args.temperature}, {args.steps} steps")
    print(f"noise on every entry      {old * 1000:8.1f} ms/step")
    print(f"noise where it could win  {new * 1000:8.1f} ms/step   same tokens: {same}")
    print(f"speedup={old / new:.1f}x same_tokens={same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
