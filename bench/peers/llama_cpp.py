"""Peer: llama.cpp (llama-cpp-python's low-level API) on the bundled GGUF, batched, shared prefix once.

    PYTHON -m bench.peers.llama_cpp --input FILE --requests 256 --max-tokens 96 --threads 2 \\
        --prompts JSON [--gguf PATH] [--parallel 64] [--n-batch 2048] [--n-ubatch 512] [--no-unified]

Runs under any python that has llama-cpp-python (and numpy); it imports nothing of genq, so it needs
the GGUF path and the prompts from the parent (--prompts, --gguf). Without --prompts it renders
--input itself, which needs transformers.

Continuous batching in the way of llama.cpp's `parallel` example: the tokens that every prompt
shares (the system prompt and the start of the user message) are decoded once into sequence 0;
--parallel slots (sequences 1..N) each get them by llama_memory_seq_cp (metadata only in a unified
KV cache, no copy), then their own suffix is prefilled and they decode one token per step, all in
one llama_decode per step; a slot whose request ends (EOS or --max-tokens) is cleared and takes the
next prompt in the same step as the others' decode tokens. Greedy: argmax of the logits (numpy).
Token ids are the parent's (the HF tokenizer and llama.cpp's agree on all 256 prompts).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.peers import (
    base_parser,
    emit,
    emit_error,
    load_workload,
    now,
    quiet_stdout,
    result,
    save_outputs,
    self_peak_rss_mb,
)

ENGINE = "llama.cpp"
NOT_INSTALLED = "llama-cpp-python is not installed (bench/install_peers.sh)"


def main() -> None:
    quiet_stdout()
    ap = base_parser(__doc__)
    ap.add_argument("--parallel", type=int, default=64, help="sequences decoded together")
    ap.add_argument("--n-batch", type=int, default=2048, help="most tokens in one llama_decode")
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--no-unified", action="store_true", help="one KV stream per sequence instead of one unified")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash attention (auto: its default, on for CPU)")
    ap.add_argument("--save-outputs", type=Path, default=None, help="write the generated token ids here (JSON)")
    args = ap.parse_args()
    try:
        import llama_cpp as L
        import numpy as np
    except ImportError:
        emit_error(ENGINE, NOT_INSTALLED)
        return
    try:
        run(args, L, np)
    except Exception as e:  # noqa: BLE001 - the parent wants a reason
        import traceback

        traceback.print_exc()
        emit_error(ENGINE, f"{type(e).__name__}: {e}")


def run(args, L, np) -> None:
    work = load_workload(args)
    gguf = work["gguf"]
    prompts = [list(p["ids"]) for p in work["prompts"]]
    eos = int(work["eos_token_id"])
    max_new = args.max_tokens
    n_slots = max(1, min(args.parallel, len(prompts), 255))

    # the shared prefix, at least one token short of the shortest prompt (its last token needs logits)
    prefix = 0
    first = prompts[0]
    shortest = min(len(p) for p in prompts)
    while prefix < shortest - 1 and all(p[prefix] == first[prefix] for p in prompts):
        prefix += 1
    longest_suffix = max(len(p) for p in prompts) - prefix
    n_batch = max(args.n_batch, longest_suffix + n_slots)
    # cells: the prefix once, and for every slot its longest suffix and its generated tokens
    n_ctx = prefix + n_slots * (longest_suffix + max_new) + 256
    n_ctx = (n_ctx + 255) // 256 * 256

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(gguf.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama_model_load_from_file failed for {gguf}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = min(args.n_ubatch, n_batch)
    cparams.n_seq_max = n_slots + 1
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.kv_unified = not args.no_unified
    cparams.no_perf = True
    cparams.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(n_batch, 0, 1)

    def is_end(tok: int) -> bool:
        return tok == eos or bool(L.llama_vocab_is_eog(vocab, tok))

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(items)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({len(items)} tokens)")

    def argmax_rows(n_out: int) -> list[int]:
        if n_out == 0:
            return []
        ptr = L.llama_get_logits(ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab))
        return logits.argmax(axis=1).tolist()

    # a short warm-up, not timed: one token that no request shares past position 0
    decode([(first[0], 0, 0, True)])
    L.llama_memory_clear(mem, True)

    t0 = now()
    # 1) the shared prefix, once, into sequence 0
    for start in range(0, prefix, n_batch):
        chunk = first[start : min(prefix, start + n_batch)]
        decode([(t, start + j, 0, False) for j, t in enumerate(chunk)])

    # 2) continuous batching over the slots
    slot_req = [-1] * (n_slots + 1)  # slot (sequence id 1..n_slots) -> request index
    slot_pos = [0] * (n_slots + 1)  # next position
    slot_last = [0] * (n_slots + 1)  # token to feed next
    slot_gen = [0] * (n_slots + 1)  # tokens generated so far
    outputs: list[list[int]] = [[] for _ in prompts]
    next_req = 0
    done = 0
    tokens = 0
    steps = 0
    max_step_tokens = 0
    while done < len(prompts):
        items: list[tuple[int, int, int, bool]] = []
        out_slots: list[int] = []
        for s in range(1, n_slots + 1):
            if slot_req[s] >= 0:
                items.append((slot_last[s], slot_pos[s], s, True))
                out_slots.append(s)
        for s in range(1, n_slots + 1):
            if slot_req[s] >= 0 or next_req >= len(prompts):
                continue
            suffix = prompts[next_req][prefix:]
            if items and len(items) + len(suffix) > n_batch:
                break
            L.llama_memory_seq_rm(mem, s, -1, -1)
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
            for j, t in enumerate(suffix):
                items.append((t, prefix + j, s, j == len(suffix) - 1))
            out_slots.append(s)
            slot_req[s] = next_req
            slot_pos[s] = prefix + len(suffix) - 1  # the decode below advances it
            slot_gen[s] = 0
            next_req += 1
        # logits come back in batch order: decode tokens first, then each new suffix's last token
        decode(items)
        steps += 1
        max_step_tokens = max(max_step_tokens, len(items))
        for s, tok in zip(out_slots, argmax_rows(len(out_slots)), strict=True):
            slot_gen[s] += 1
            outputs[slot_req[s]].append(tok)
            slot_pos[s] += 1
            tokens += 1
            if is_end(tok) or slot_gen[s] >= max_new:
                slot_req[s] = -1
                L.llama_memory_seq_rm(mem, s, -1, -1)
                done += 1
            else:
                slot_last[s] = tok
    seconds = now() - t0
    print(f"[llama.cpp] {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s "
          f"({steps} decode calls)", file=sys.stderr)

    if args.save_outputs:
        save_outputs(args.save_outputs, work, outputs)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    quant = os.path.basename(gguf).rsplit(".", 2)[-2] if gguf.count(".") >= 2 else "gguf"
    unified = "unified KV" if not args.no_unified else "per-sequence KV"
    config = (f"{quant}, {n_slots} sequences batched, shared prefix ({prefix} tokens) computed once, {unified}")
    emit(result(ENGINE, config, tokens, seconds, self_peak_rss_mb(),
                llama_cpp_python=getattr(L, "__version__", "?"), gguf=os.path.basename(gguf),
                requests=len(prompts), tok_s=round(tokens / seconds, 2), shared_prefix_tokens=prefix,
                flash_attn=args.flash_attn, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=cparams.n_ubatch, decode_calls=steps,
                max_tokens_per_call=max_step_tokens))


if __name__ == "__main__":
    main()
