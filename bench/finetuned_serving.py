"""What serving a fine-tuned model as a merged copy costs: a batch that mixes base and fine-tuned lines
against the same batch on the base model alone, in one process, side by side in one run.

    .venv/bin/python bench/finetuned_serving.py [--requests 128] [--max-tokens 64] [--threads 2]

The fine-tuned model is the bundled SmolLM2-135M with a LoRA adapter (rank 8 on every projection,
random B so the merged weights differ from the base) merged into a copy of its weights, as
workers/fine_tuning/serving.py serves one. Rows: the base model alone; the fine-tuned copy alone; half
the lines on each, submitted together (two engines, one per model, stepping on their own threads:
what a worker does with a file that names both). Printed: tokens/s, the ratio to the base alone, and
the memory and load time the copy adds. Prompts are the first --requests lines of
examples/catalog_batch.jsonl, greedy.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return float(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run(groups: list[tuple[object, list]]) -> tuple[int, float]:
    """Submits every (model, requests) group at once; (generated tokens, wall seconds) until all end."""
    start = time.perf_counter()
    handles = [lm.submit(requests) for lm, requests in groups]
    tokens = 0
    for handle in handles:
        while not handle.done:
            tokens += sum(len(r.token_ids) for r in handle.results(timeout=1.0))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from genq.settings import get_settings
    from workers.fine_tuning.lora import LoraAdapters, LoraConfig, merge_into
    from workers.registry import bundled_gguf_path
    from workers.runtime.loader import engine_config, read_checkpoint, resolve_dtype, serve_checkpoint
    from workers.runtime.types import GenerationRequest, SamplingParams
    from workers.runtime.weights import fuse_projections

    settings = get_settings()
    dtype = resolve_dtype(settings, torch.device("cpu"))
    checkpoint = read_checkpoint(bundled_gguf_path())
    fused = fuse_projections(checkpoint.tensors, checkpoint.config)

    def serve(state: dict, name: str):
        return serve_checkpoint(checkpoint, state, device="cpu", dtype=dtype, model_id=name, context_length=2048,
                                engine_config=engine_config(settings))

    base = serve(fused, "base")
    before, started = rss_mb(), time.perf_counter()
    adapters = LoraAdapters(checkpoint.config, LoraConfig(rank=8, alpha=16), seed=0)
    with torch.no_grad():
        for name, parameter in adapters.named_parameters():
            if ".lora_B." in f".{name}":
                parameter.normal_(0, 0.01)
    tuned = serve(merge_into(fused, adapters), "fine-tuned")
    load_seconds, added_mb = time.perf_counter() - started, rss_mb() - before

    lines = [json.loads(x) for x in (ROOT / "examples" / "catalog_batch.jsonl").open() if x.strip()][:args.requests]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def requests(lm, part: list) -> list:
        return [GenerationRequest(request_id=line["custom_id"], params=params,
                                  prompt_token_ids=lm.render_chat(line["body"]["messages"])) for line in part]

    half = len(lines) // 2
    run([(base, requests(base, lines[:8]))])  # warm-up: first-call costs out of the timed rows
    run([(tuned, requests(tuned, lines[:8]))])
    rows = [("base model alone", run([(base, requests(base, lines))])),
            ("fine-tuned copy alone", run([(tuned, requests(tuned, lines))])),
            ("mixed: half base, half fine-tuned", run([(base, requests(base, lines[:half])),
                                                       (tuned, requests(tuned, lines[half:]))]))]
    reference = rows[0][1][0] / rows[0][1][1]
    print(f"{len(lines)} requests, greedy, max {args.max_tokens} tokens, {str(dtype).removeprefix('torch.')}, "
          f"{args.threads} threads")
    print(f"{'run':<36}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs base':>9}")
    for label, (tokens, seconds) in rows:
        print(f"{label:<36}{tokens:>8}{seconds:>9.2f}{tokens / seconds:>9.1f}{tokens / seconds / reference:>8.2f}x")
    print(f"the merged copy: +{added_mb:.0f} MB resident, {load_seconds:.1f} s to merge and load")
    for lm in (base, tuned):
        lm.loop.close()


if __name__ == "__main__":
    main()
