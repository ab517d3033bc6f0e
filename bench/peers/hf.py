"""Peer: Hugging Face transformers `generate`, greedy, left padding, on the GGUF's fp32 safetensors.

    python -m bench.peers.hf --input FILE --requests 256 --max-tokens 96 --threads 2 [--prompts JSON]
        [--configs bf16:16,bf16:32,bf16:64,fp32:32] [--probe-requests 64] [--probe-tokens 32]

It first probes each dtype:batch config on the first --probe-requests prompts (at least the largest
batch size, so every config fills one batch) for --probe-tokens new tokens, picks the fastest, then
runs all --requests prompts with it; only that full run is timed and reported (the probe figures go
to "extra"). Prompts are batched in order of length to waste little on padding. Peak memory is the
VmHWM of the full run (reset after the probe; it includes the loaded weights).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.peers import (  # noqa: E402
    base_parser,
    emit,
    emit_error,
    ensure_safetensors_dir,
    load_workload,
    now,
    quiet_stdout,
    reset_peak_rss,
    result,
    save_outputs,
    self_peak_rss_mb,
)

ENGINE = "transformers"


def parse_configs(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        dtype, _, batch = item.strip().partition(":")
        if dtype not in ("bf16", "fp32") or not batch.isdigit():
            raise ValueError(f"bad config {item!r}: want bf16:N or fp32:N")
        out.append((dtype, int(batch)))
    return out


def generate_all(torch, model, prompts: list[list[int]], batch: int, max_new: int, eos: int, pad: int,
                 outputs: list[list[int]] | None = None) -> int:
    """Greedy generation of every prompt, `batch` at a time; returns generated tokens incl. EOS.

    With `outputs` (one list per prompt), the generated ids of each prompt go there.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    total = 0
    for start in range(0, len(order), batch):
        group = [prompts[i] for i in order[start : start + batch]]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, p in enumerate(group):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
            )
        new = out[:, width:]
        for r, row in enumerate(new.tolist()):
            n = len(row)
            if eos in row:
                n = row.index(eos) + 1
            total += n
            if outputs is not None:
                outputs[order[start + r]] = row[:n]
    return total


def main() -> None:
    quiet_stdout()
    ap = base_parser(__doc__)
    ap.add_argument("--configs", default="bf16:16,bf16:32,bf16:64,fp32:32",
                    help="dtype:batch configs to probe (bf16 or fp32)")
    ap.add_argument("--probe-requests", type=int, default=0,
                    help="prompts of the probe (default: the largest batch size, at most --requests)")
    ap.add_argument("--probe-tokens", type=int, default=32, help="new tokens per request in the probe")
    ap.add_argument("--save-outputs", type=Path, default=None, help="write the generated token ids here (JSON)")
    args = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        emit_error(ENGINE, f"transformers/torch not importable: {e}")
        return
    torch.set_num_threads(args.threads)
    try:
        configs = parse_configs(args.configs)
        work = load_workload(args)
        model_dir = work.get("model_dir") or str(ensure_safetensors_dir(args.gguf))
        prompts = [p["ids"] for p in work["prompts"]]
        eos, pad = int(work["eos_token_id"]), int(work["pad_token_id"])

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        models = {}
        for d in sorted({d for d, _ in configs}):
            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes[d])
            m.eval()
            models[d] = m

        probe = {}
        best = configs[0]
        if len(configs) > 1:
            n_probe = args.probe_requests or max(b for _, b in configs)
            n_probe = min(n_probe, len(prompts))
            probe_tokens = min(args.probe_tokens, args.max_tokens)
            # one untimed warm-up call per dtype (first-call allocations, oneDNN primitive creation)
            for m in models.values():
                generate_all(torch, m, prompts[:2], 2, 2, eos, pad)
            for d, b in configs:
                t0 = now()
                toks = generate_all(torch, models[d], prompts[:n_probe], b, probe_tokens, eos, pad)
                dt = now() - t0
                probe[f"{d}:{b}"] = round(toks / dt, 1)
                print(f"[hf] probe {d} batch {b}: {toks} tokens in {dt:.1f}s = {toks / dt:.1f} tok/s",
                      file=sys.stderr)
            best = max(configs, key=lambda c: probe[f"{c[0]}:{c[1]}"])
        dtype, batch = best
        model = models[dtype]
        m = models = None  # drop the other dtype's weights before the peak is reset
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        reset_peak_rss()
        if not probe:
            generate_all(torch, model, prompts[:2], 2, 2, eos, pad)

        outputs: list[list[int]] = [[] for _ in prompts]
        t0 = now()
        tokens = generate_all(torch, model, prompts, batch, args.max_tokens, eos, pad, outputs)
        seconds = now() - t0
        if args.save_outputs:
            save_outputs(args.save_outputs, work, outputs)
        print(f"[hf] {dtype} batch {batch}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s",
              file=sys.stderr)
        import transformers

        extra = {"transformers": transformers.__version__, "torch": torch.__version__,
                 "requests": len(prompts), "tok_s": round(tokens / seconds, 2)}
        if probe:
            extra["probe_tok_s"] = probe
            extra["probe"] = f"first {n_probe} prompts, {probe_tokens} new tokens"
        emit(result(ENGINE, f"{dtype}, batch {batch}, left padding, generate", tokens, seconds,
                    self_peak_rss_mb(), **extra))
    except Exception as e:  # noqa: BLE001 - the parent wants a reason, not a traceback
        import traceback

        traceback.print_exc()
        emit_error(ENGINE, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
