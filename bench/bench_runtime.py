"""Generated tokens/s of genq's runtime beside Hugging Face `generate`, same GGUF, same prompts, greedy.

    .venv/bin/python bench/bench_runtime.py [--new-tokens 32] [--batch-sizes 1 32] [--device cpu]

Both models are the bundled SmolLM2-135M-Instruct GGUF dequantized to fp32 (bf16 on CUDA). Prompts
are the chat messages of examples/catalog_batch.jsonl under the model's chat template. Every request
generates exactly --new-tokens tokens (eos ignored on both sides), so tokens/s = batch * new tokens /
wall time of the generate call (prefill included). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import kernels  # noqa: E402
from workers.registry import bundled_gguf_path  # noqa: E402
from workers.runtime.loader import LoadedModel, load_checkpoint  # noqa: E402
from workers.runtime.types import GenerationRequest, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def chat_prompts(lm: LoadedModel, path: Path, count: int) -> list[list[int]]:
    """Token ids of the first `count` chat requests of a batch input file (cycled if fewer)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chats = [line["body"]["messages"] for line in lines if "messages" in line["body"]]
    return [lm.render_chat(chats[i % len(chats)]) for i in range(count)]


def load_hf(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ValueError as e:  # transformers wants accelerate for GGUF; its converter works without it
        if "accelerate" not in str(e):
            raise
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name),
                                                 dtype=dtype)
        model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"],
                              strict=False)
        model.tie_weights()
    return model.to(device).eval()


class SamplingClock:
    """Wraps kernels.sample to add up the wall time spent in it (on CUDA only the launch: the kernel runs
    asynchronously and its tokens are read back by the generator)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._sample = kernels.sample

    def __call__(self, logits: torch.Tensor, meta: kernels.SamplingMetadata):
        start = time.perf_counter()
        try:
            return self._sample(logits, meta)
        finally:
            self.seconds += time.perf_counter() - start


def genq_generate(lm: LoadedModel, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    results = lm.generate([GenerationRequest(str(i), p, params) for i, p in enumerate(prompts)],
                          max_batch_size=len(prompts))
    return sum(r.completion_tokens for r in results)


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, device: torch.device) -> int:
    width = max(len(p) for p in prompts)  # left padding, as batched decoder-only generation needs
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts)


def timed(fn, *args) -> tuple[int, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompts", type=Path, default=ROOT / "examples" / "catalog_batch.jsonl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = bundled_gguf_path()
    lm = load_checkpoint(path, device=device, dtype=dtype)
    hf = load_hf(path, device, dtype)
    pad_id = lm.tokenizer.special.pad_id if lm.tokenizer.special.pad_id is not None else 0
    warm = chat_prompts(lm, args.prompts, 2)
    genq_generate(lm, warm, 4)
    hf_generate(hf, warm, 4, pad_id, device)

    clock = SamplingClock()
    kernels.sample = clock  # the model calls kernels.sample through the module: count its time

    print(f"device {device} {dtype}, threads {torch.get_num_threads()}, {args.new_tokens} new tokens per request, "
          f"greedy, eos ignored")
    print(f"{'batch':>5} {'prompt toks':>11} {'genq tok/s':>11} {'HF tok/s':>9} {'genq/HF':>8} "
          f"{'genq sampling s':>15} {'genq s':>7} {'HF s':>7}")
    for batch in args.batch_sizes:
        prompts = chat_prompts(lm, args.prompts, batch)
        clock.seconds = 0.0
        ours, ours_s = timed(genq_generate, lm, prompts, args.new_tokens)
        theirs, theirs_s = timed(hf_generate, hf, prompts, args.new_tokens, pad_id, device)
        ours_rate, theirs_rate = ours / ours_s, theirs / theirs_s
        print(f"{batch:>5} {sum(map(len, prompts)):>11} {ours_rate:>11.1f} {theirs_rate:>9.1f} "
              f"{ours_rate / theirs_rate:>8.2f} {clock.seconds:>15.2f} {ours_s:>7.2f} {theirs_s:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
