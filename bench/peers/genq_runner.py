"""genq's side of bench/engine_vs_peers.py: the first N catalog lines through `genq run`'s own code.

    python -m bench.peers.genq_runner --input FILE --requests 256 --max-tokens 96 --threads 2

The lines are rewritten to greedy with max_tokens N (the same workload the peers get), then run by
genq.cli.embedded.run (SQLite, a local store, shards on threads feeding one engine: what `genq run`
does) with the model loaded beforehand, so that the timed region is the whole batch: create,
shards, generation, result rows, finalize, output files. Its extras: the prefix-cache hit rate, the
share of the compute limit (2 x parameters FLOP per generated token against this machine's measured
matmul FLOP/s in the dtype used) and the perplexity difference to fp32 on held-out chat text
(examples/finetune_brand_voice.jsonl, not the benchmark's prompts).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import base_parser, emit, emit_error, quiet_stdout, reset_peak_rss, self_peak_rss_mb

HELD_OUT = Path(__file__).resolve().parents[2] / "examples" / "finetune_brand_voice.jsonl"


def write_workload(src: Path, dst: Path, requests: int, max_tokens: int) -> None:
    with src.open() as f, dst.open("w") as out:
        for line in [raw for raw in f if raw.strip()][:requests]:
            item = json.loads(line)
            item["body"].update(temperature=0, max_tokens=max_tokens)
            out.write(json.dumps(item) + "\n")


def matmul_flops(dtype, m: int = 256, k: int = 576, n: int = 1536, repeats: int = 30) -> float:
    """Measured FLOP/s of an [m, k] x [k, n] matmul (the model's MLP shape at a full decode batch)."""
    import torch

    a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(5):
        torch.nn.functional.linear(a, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(a, w)
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def held_out_sequences(lm, count: int = 32) -> list[list[int]]:
    from workers.runtime.chat_template import render_chat_template

    special = lm.tokenizer.special
    chats = [json.loads(line)["messages"] for line in HELD_OUT.open() if line.strip()][:count]
    return [lm.tokenizer.encode(render_chat_template(lm.chat_template, messages, add_generation_prompt=False,
                                                     bos_token=special.bos_token, eos_token=special.eos_token),
                                add_bos=False) for messages in chats]


def main() -> None:
    quiet_stdout()
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from genq.cli.embedded import run
    from genq.settings import get_settings
    from workers.registry import BUNDLED_MODEL_ID, bundled_gguf_path
    from workers.runtime.evaluate import perplexity
    from workers.runtime.loader import load_checkpoint, load_model

    settings = get_settings()
    lm = load_model(BUNDLED_MODEL_ID)  # cached: the run below finds it loaded
    dtype = lm.model.tok_embeddings.weight.dtype
    with tempfile.TemporaryDirectory(prefix="genq-bench-run-") as tmp:
        workload = Path(tmp) / "workload.jsonl"
        write_workload(args.input, workload, args.requests, args.max_tokens)
        reset_peak_rss()
        before = lm.engine.stats()
        start = time.perf_counter()
        try:
            run(workload, output=Path(tmp) / "out.jsonl", model=None, home=Path(tmp) / "home")
        except SystemExit as exit_:  # typer.Exit on a failed batch
            if exit_.code:
                emit_error("genq", f"genq run exited {exit_.code}")
                return
        seconds = time.perf_counter() - start
        peak = self_peak_rss_mb()
        lines = [json.loads(line) for line in (Path(tmp) / "out.jsonl").open()]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    after = lm.engine.stats()
    params = sum(p.numel() for p in lm.model.parameters())
    weights_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    memory_bound = 1.2 * (weights_mb + settings.kv_cache_mb)  # the bar: weights + KV budget + 20%
    flops = matmul_flops(dtype)
    held_out = held_out_sequences(lm)
    ppl = perplexity(lm.model, held_out)
    ppl32 = ppl if dtype == torch.float32 else perplexity(
        load_checkpoint(bundled_gguf_path(), dtype=torch.float32).model, held_out)
    config = (f"{str(dtype).removeprefix('torch.')}, max_batch {settings.max_batch_size}, step tokens "
              f"{settings.max_step_tokens}, KV blocks of {settings.kv_block_size}, prefix caching "
              f"{'on' if settings.prefix_caching else 'off'}, {settings.worker_shards} shards at once")
    emit({
        "engine": "genq", "config": config, "tokens": tokens, "seconds": round(seconds, 4),
        "peak_rss_mb": round(peak, 1),
        "extra": {
            "requests_ok": len(lines),
            "prefix_cache_hit_rate": round(after.prefix_hit_rate, 4),
            "preemptions": after.preemptions - before.preemptions,
            "compute_share": round(2 * params * tokens / seconds / flops, 4),
            "matmul_gflops": round(flops / 1e9, 1),
            "perplexity": round(ppl, 4),
            "perplexity_fp32": round(ppl32, 4),
            "perplexity_delta_pct": round(100 * (ppl - ppl32) / ppl32, 3),
            "kv_cache_mb": settings.kv_cache_mb,
            "weights_mb": round(weights_mb, 1),
            "memory_bound_mb": round(memory_bound, 1),
            "within_memory_bound": peak <= memory_bound,
        },
    })


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # reported as the peer's row, not a traceback lost in stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        emit_error("genq", f"{type(exc).__name__}: {exc}")
