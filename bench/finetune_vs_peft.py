"""genq's LoRA trainer beside Hugging Face PEFT + a plain torch loop: trained tokens/s, peak RSS, validation loss.

    .venv/bin/python bench/finetune_vs_peft.py [--steps 12] [--batch-size 8] [--max-length 256] [--rank 8]
        [--alpha 16] [--learning-rate 1e-3] [--threads 2] [--sides genq,genq-bf16,peft,peft-bf16] [--timeout 1200]

Workload: examples/finetune_brand_voice.jsonl through genq's contract and chat-template tokenization
(workers.fine_tuning.prepare, seed 0): 216 training chats and 24 held-out ones. Both sides get the
same token ids and loss masks (assistant replies only), the same examples in the same order per step
(genq's seeded epoch order), the same LoRA (rank, alpha, every projection, no dropout) starting from
the same A (genq's seeded kaiming init, B = 0), AdamW with the same warmup + cosine learning rate,
gradient clipping at 1.0, --batch-size examples per optimizer step, --steps steps. Model: the bundled
SmolLM2-135M-Instruct GGUF converted once to an fp32 safetensors directory (bench/peers), loaded by
both sides.

    genq       workers.fine_tuning.trainer: packed rows (no padding), fused q/k/v and gate/up matmuls,
               logits only at target positions. genq-bf16: the same with bf16 base weights and autocast
               (fp32 adapters and losses).
    peft       transformers LlamaForCausalLM + peft.get_peft_model, right padding to the longest example
               of each batch, labels -100 off the replies, model(...).loss.backward(). peft-bf16: the
               model loaded in bf16 (PEFT keeps fp32 adapters).

trained tokens/s = non-padding tokens of the training steps / wall time of those steps (model load and
evaluation excluded; the first step's warm-up included on both sides). Peak RSS: each side runs in its
own process (one after another); "load" is VmHWM after loading, "train" the VmHWM of the training steps
alone (reset after loading). Validation loss: token-mean cross entropy over the 24 held-out chats'
reply tokens, before and after training, in each side's own precision; bf16 sides are also evaluated
in fp32 (the trained adapters on the fp32 base). Table on stdout, JSON in results/finetune_vs_peft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.peers import ensure_safetensors_dir, reset_peak_rss, self_peak_rss_mb  # noqa: E402

SIDES = ("genq", "genq-bf16", "peft", "peft-bf16")
TRAINING_FILE = ROOT / "examples" / "finetune_brand_voice.jsonl"
WARMUP_FRACTION = 0.05
SEED = 0


# ---------------------------------------------------------------- the workload (parent process)


def write_workload(path: Path, args: argparse.Namespace, model_dir: Path) -> dict:
    """Token ids, masks and the per-step example order, for both sides."""
    from workers.fine_tuning.data import Method, read_training_file
    from workers.fine_tuning.prepare import prepare
    from workers.fine_tuning.trainer import epoch_order
    from workers.registry import bundled_gguf_path
    from workers.runtime.loader import read_checkpoint

    checkpoint = read_checkpoint(bundled_gguf_path())  # the tokenizer and template the safetensors dir came with
    with TRAINING_FILE.open("rb") as f:
        training = read_training_file(f, Method.SUPERVISED)
    data = prepare(training, checkpoint.tokenizer, checkpoint.chat_template, max_length=args.max_length, seed=SEED)
    steps_per_epoch = -(-len(data.train) // args.batch_size)
    if args.steps > steps_per_epoch:
        raise SystemExit(f"--steps must be at most one epoch ({steps_per_epoch} steps of {args.batch_size})")
    order = epoch_order(len(data.train), SEED, 0)
    workload = {
        "model_dir": str(model_dir), "steps": args.steps, "batch_size": args.batch_size,
        "total_steps": steps_per_epoch,  # the learning-rate schedule spans one epoch; --steps run of it
        "learning_rate": args.learning_rate, "rank": args.rank, "alpha": args.alpha, "threads": args.threads,
        "pad_id": checkpoint.tokenizer.special.pad_id or 0,
        "train": [{"ids": list(e.input_ids), "mask": list(e.loss_mask)} for e in data.train],
        "validation": [{"ids": list(e.input_ids), "mask": list(e.loss_mask)} for e in data.validation],
        "step_examples": [order[s * args.batch_size:(s + 1) * args.batch_size] for s in range(args.steps)],
    }
    path.write_text(json.dumps(workload))
    return workload


# ---------------------------------------------------------------- one side (child process)


def initial_adapters(model_config, workload: dict):
    from workers.fine_tuning.lora import LoraAdapters, LoraConfig

    return LoraAdapters(model_config, LoraConfig(rank=workload["rank"], alpha=workload["alpha"]), seed=SEED)


def run_genq(workload: dict, bf16: bool) -> dict:
    import torch

    from workers.fine_tuning.data import Method
    from workers.fine_tuning.hyperparameters import BASE_LEARNING_RATE, ResolvedHyperparameters
    from workers.fine_tuning.lora import LoraConfig
    from workers.fine_tuning.objectives import token_scores
    from workers.fine_tuning.packing import pack
    from workers.fine_tuning.prepare import PreparedData, TokenizedChat
    from workers.fine_tuning.train_forward import hidden_states, target_logprobs
    from workers.fine_tuning.trainer import Trainer, TrainerConfig
    from workers.runtime.loader import read_checkpoint
    from workers.runtime.model import build_model
    from workers.runtime.weights import fuse_projections

    def load(dtype: torch.dtype):
        checkpoint = read_checkpoint(workload["model_dir"])  # dropped once built: only the model stays
        return build_model(checkpoint.config, fuse_projections(checkpoint.tensors, checkpoint.config),
                           torch.device("cpu"), dtype)

    model = load(torch.bfloat16 if bf16 else torch.float32)

    def chats(rows: list[dict]) -> list[TokenizedChat]:
        return [TokenizedChat(tuple(r["ids"]), tuple(r["mask"])) for r in rows]

    data = PreparedData(Method.SUPERVISED, chats(workload["train"]), chats(workload["validation"]), {})
    hyper = ResolvedHyperparameters(n_epochs=1, batch_size=workload["batch_size"],
                                    learning_rate_multiplier=workload["learning_rate"] / BASE_LEARNING_RATE, beta=None)
    lora = LoraConfig(rank=workload["rank"], alpha=workload["alpha"])
    trainer = Trainer(model, data, TrainerConfig(Method.SUPERVISED, hyper, lora, seed=SEED,
                                                 warmup_fraction=WARMUP_FRACTION, log_every=1))
    assert trainer.total_steps == workload["total_steps"]
    assert [trainer.step_examples(s) for s in range(workload["steps"])] == workload["step_examples"]
    before = trainer.evaluate()["valid_loss"]
    load_peak = self_peak_rss_mb()
    reset_peak_rss()
    train_losses = []
    seconds = 0.0
    for _ in range(workload["steps"]):  # a segment per step: the time of the steps alone, each step's loss
        t0 = time.perf_counter()
        result = trainer.run_segment(max_steps=1)
        seconds += time.perf_counter() - t0
        train_losses.append(result.metrics[-1]["train_loss"])
    train_peak = self_peak_rss_mb()
    after = trainer.evaluate()["valid_loss"]
    out = {"tokens": trainer.trained_tokens, "seconds": seconds, "load_peak_rss_mb": load_peak,
           "train_peak_rss_mb": train_peak, "valid_loss_before": before, "valid_loss_after": after,
           "train_losses": train_losses}
    if bf16:  # the same adapters on the fp32 base weights
        del model, trainer.model
        fp32 = load(torch.float32)
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for _, row in pack([(e.input_ids, e.loss_mask) for e in data.validation], 4096):
                scores = token_scores(target_logprobs(fp32, hidden_states(fp32, row, trainer.adapters), row))
                loss_sum, count = loss_sum + float(scores.loss_sum), count + scores.count
        out["valid_loss_after_fp32"] = loss_sum / count
    return out


def _padded(torch, rows: list[dict], pad_id: int):
    """(input_ids, attention_mask, labels) [B, longest]: right padding, labels -100 off the targets."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(r["mask"]).bool(), torch.tensor(r["ids"]), -100)
    return ids, attention, labels


def run_peft(workload: dict, bf16: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from workers.fine_tuning.trainer import learning_rate_at
    from workers.runtime.config import config_from_hf

    model_dir = Path(workload["model_dir"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = PeftLoraConfig(r=workload["rank"], lora_alpha=workload["alpha"], lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"])
    model = get_peft_model(base, lora)
    init = initial_adapters(config_from_hf(json.loads((model_dir / "config.json").read_text())), workload)
    result = set_peft_model_state_dict(model, init.adapter_state_dict())
    assert not result.unexpected_keys, result.unexpected_keys
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=workload["learning_rate"], weight_decay=0.0)
    pad = workload["pad_id"]

    def validation_loss() -> float:
        model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            rows = workload["validation"]
            for start in range(0, len(rows), workload["batch_size"]):
                ids, attention, labels = _padded(torch, rows[start:start + workload["batch_size"]], pad)
                logits = model(input_ids=ids, attention_mask=attention).logits.float()
                loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=-100, reduction="sum"))
                count += int((labels[:, 1:] != -100).sum())
        model.train()
        return loss_sum / count

    before = validation_loss()
    load_peak = self_peak_rss_mb()
    reset_peak_rss()
    tokens, seconds = 0, 0.0
    train_losses = []
    for step, indices in enumerate(workload["step_examples"]):
        t0 = time.perf_counter()
        rows = [workload["train"][i] for i in indices]
        ids, attention, labels = _padded(torch, rows, pad)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, workload["total_steps"], workload["learning_rate"],
                                           WARMUP_FRACTION, 0.0)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(attention.sum())
        train_losses.append(float(loss.detach()))
    train_peak = self_peak_rss_mb()
    out = {"tokens": tokens, "seconds": seconds, "load_peak_rss_mb": load_peak, "train_peak_rss_mb": train_peak,
           "valid_loss_before": before, "valid_loss_after": validation_loss(), "train_losses": train_losses}
    if bf16:  # the same adapters on the fp32 base weights
        trained = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
        del model, base
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
        assert not set_peft_model_state_dict(model, trained).unexpected_keys
        out["valid_loss_after_fp32"] = validation_loss()
    return out


def run_side(side: str, workload_path: Path) -> None:
    """Child: one side, one JSON line on stdout."""
    workload = json.loads(workload_path.read_text())
    import torch

    torch.set_num_threads(workload["threads"])
    torch.manual_seed(SEED)
    bf16 = side.endswith("-bf16")
    row = run_genq(workload, bf16) if side.startswith("genq") else run_peft(workload, bf16)
    row["side"] = side
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- parent: run the sides, print the table


def run_child(side: str, workload_path: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-side", side, "--workload", str(workload_path)]
    print(f"[bench] {side} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:.0f}s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"side": side, "error": f"exit code {proc.returncode}: {tail[0][:300]}"}
    row = json.loads(lines[-1])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"[bench] {side}: {row['tokens'] / row['seconds']:.0f} trained tokens/s", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'side':<10} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'load RSS MB':>12} {'train RSS MB':>13} "
            f"{'valid before':>13} {'valid after':>12} {'after (fp32)':>13}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['side']:<10} error: {r['error']}")
            continue
        fp32 = r.get("valid_loss_after_fp32")
        out.append(f"{r['side']:<10} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>7.1f} "
                   f"{r['load_peak_rss_mb']:>12.0f} {r['train_peak_rss_mb']:>13.0f} {r['valid_loss_before']:>13.4f} "
                   f"{r['valid_loss_after']:>12.4f} {'' if fp32 is None else f'{fp32:.4f}':>13}")
    return "\n".join(out)


def ratio(rows: dict[str, dict], a: str, b: str) -> str:
    if a not in rows or b not in rows or "error" in rows[a] or "error" in rows[b]:
        return f"{a}_vs_{b}=nan"
    speed = (rows[a]["tokens"] / rows[a]["seconds"]) / (rows[b]["tokens"] / rows[b]["seconds"])
    loss_a, loss_b = rows[a]["valid_loss_after"], rows[b]["valid_loss_after"]
    return f"{a}_vs_{b}={speed:.2f}x (valid loss {loss_a:.4f} vs {loss_b:.4f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per side")
    p.add_argument("--run-side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_side:
        run_side(args.run_side, args.workload)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    model_dir = ensure_safetensors_dir()
    with tempfile.TemporaryDirectory() as tmp:
        workload_path = Path(tmp) / "workload.json"
        workload = write_workload(workload_path, args, model_dir)
        rows = [run_child(side, workload_path, args.timeout) for side in sides]
    import torch

    print(f"LoRA fine-tuning, SmolLM2-135M-Instruct, {args.steps} steps x {args.batch_size} chats "
          f"(max_length {args.max_length}), rank {args.rank}, alpha {args.alpha:g}, lr {args.learning_rate:g}, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
          f"{len(workload['validation'])} validation chats")
    print(table(rows))
    by_side = {r["side"]: r for r in rows}
    lines = [ratio(by_side, "genq", "peft"), ratio(by_side, "genq-bf16", "peft-bf16"),
             ratio(by_side, "genq-bf16", "peft")]
    print("\n".join(lines))
    out = ROOT / "results" / "finetune_vs_peft.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("run_side", "workload")},
                               "rows": rows, "ratios": lines}, indent=2, default=str))


if __name__ == "__main__":
    main()
