"""The LoRA trainer: SFT or DPO on a frozen decoder, run in resumable segments.

    trainer = Trainer(model, prepared, TrainerConfig(method, resolved_hyperparameters, lora))
    while not (result := trainer.run_segment(max_seconds=60, should_stop=cancelled)).finished:
        save(trainer.state_bytes())            # a killed worker resumes from here
        if result.epoch_completed: ...         # a checkpoint per epoch
    adapters = trainer.adapters

A step takes batch_size examples in the epoch's order (a permutation drawn from (seed, epoch), so a
resumed run sees the same order), packs them into rows of at most row_tokens tokens, accumulates the
gradient row by row, clips its norm and takes one AdamW step. The learning rate is a pure function
of the step (linear warmup, then cosine decay), so the state holds no scheduler object. A segment
never crosses an epoch boundary: the caller sees each epoch end and can checkpoint it.

Precision follows the base weights: fp32 weights train in fp32; bf16 weights (CUDA, or a CPU with
bf16 matmuls when the caller chooses it) run under torch.autocast with fp32 adapters and fp32 losses.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from workers.fine_tuning.data import Method
from workers.fine_tuning.hyperparameters import ResolvedHyperparameters
from workers.fine_tuning.lora import LoraAdapters, LoraConfig
from workers.fine_tuning.objectives import preference_scores, sequence_logprobs, token_scores
from workers.fine_tuning.packing import PackedBatch, pack, pack_row, plan_rows
from workers.fine_tuning.prepare import PreparedData, TokenizedChat, TokenizedPair, sequence_lengths
from workers.fine_tuning.train_forward import hidden_states, target_logprobs
from workers.runtime.host_memory import keep_freed_memory
from workers.runtime.model import Transformer

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainerConfig:
    """Everything that decides what a run computes (two runs with equal configs and data are equal)."""

    method: Method
    hyperparameters: ResolvedHyperparameters
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0  # data order, adapter init, dropout
    warmup_fraction: float = 0.05  # linear warmup over this share of the steps (at least one step)
    min_lr_ratio: float = 0.0  # the cosine decays to this share of the peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay on the adapters
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # the step's gradient is clipped to this global norm
    row_tokens: int = 2048  # tokens of one packed forward (memory bound; at least one example's); a step may
    #                         run several rows. 2048 keeps a CPU row's largest activation under glibc's 32 MB
    #                         mmap ceiling, so its buffers are reused from step to step (keep_freed_memory)
    log_every: int = 10  # a metrics dict every this many steps (and at epoch ends and the last step)
    eval_every: int | None = None  # steps between validation passes; None: at epoch ends and the end only
    eval_examples: int = 256  # valid_loss is measured on the first this many validation examples
    early_stopping_patience: int | None = None  # validation passes without a lower valid_loss before stopping
    # DPO only: weight of the chosen replies' token-mean NLL added to the DPO loss (RPO, Pang et al. 2024;
    # TRL's rpo_alpha). 0 is textbook DPO; with small models and few pairs, DPO alone lowers the chosen
    # replies' likelihood too and greedy text degenerates, which this term prevents.
    chosen_nll_weight: float = 0.0


@dataclass
class SegmentResult:
    """What one run_segment did."""

    metrics: list[dict[str, Any]]  # metrics dicts of this segment, in step order (OpenAI event `data`)
    step: int  # optimizer steps done since the start of training
    total_steps: int  # steps of the whole run (n_epochs * steps per epoch)
    epoch_completed: int | None  # 1-based epoch whose last step ended this segment (checkpoint it)
    finished: bool  # no step is left: every epoch is done, or early stopping ended the run
    stopped_early: bool  # early stopping ended the run
    cancelled: bool  # should_stop() returned True before a step


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """The learning rate of 0-based step: peak * (step + 1) / W during W warmup steps, then a cosine from
    peak towards min_lr_ratio * peak, which it would reach one step after the last."""
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The training examples' order in 0-based epoch: a permutation drawn from seed and epoch alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def _chat_sequence(example: TokenizedChat) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return example.input_ids, example.loss_mask


def _pair_sequences(example: TokenizedPair) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt + chosen, its mask), (prompt + rejected, its mask): only reply tokens are scored."""
    p = example.prompt_ids
    return [(p + reply, (0,) * len(p) + (1,) * len(reply)) for reply in (example.chosen_ids, example.rejected_ids)]


class Trainer:
    """LoRA training of one job; the base model is frozen and shared, the adapters are the trainer's."""

    def __init__(self, model: Transformer, data: PreparedData, config: TrainerConfig) -> None:
        if data.method is not config.method:
            raise ValueError(f"the data is prepared for {data.method.value}, the config says {config.method.value}")
        if config.method is Method.DPO and config.hyperparameters.beta is None:
            raise ValueError("DPO needs hyperparameters.beta")
        longest = max(sum(sequence_lengths(e)) for e in data.train + data.validation)  # a DPO pair shares a row
        self.row_tokens = max(config.row_tokens, longest)
        self.model = model.requires_grad_(False)
        self.data = data
        self.config = config
        param = model.tok_embeddings.weight
        self.device, self.compute_dtype = param.device, param.dtype
        if self.device.type == "cpu":
            keep_freed_memory()  # activations are re-allocated every step: reuse them, don't re-fault them
        self.adapters = LoraAdapters(model.config, config.lora, seed=config.seed, device=self.device)
        h = config.hyperparameters
        self.optimizer = torch.optim.AdamW(self.adapters.parameters(), lr=h.learning_rate, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(data.train) / h.batch_size)
        self.total_steps = h.n_epochs * self.steps_per_epoch
        # position and bookkeeping: all of it is in state_dict()
        self.step = 0  # optimizer steps taken
        self.dropout_generator = torch.Generator().manual_seed(config.seed + 1)
        self.best_valid_loss = math.inf
        self.evals_since_best = 0
        self.stopped_early = False
        self.trained_tokens = 0  # tokens run through training forwards (no padding exists to count)
        self.reference_logprobs: dict[str, list[float]] = {}  # DPO: "train:i"/"valid:i" -> [ref_c, ref_r]

    # -------------------------------------------------------------- position in the run

    @property
    def epoch(self) -> int:
        """0-based epoch of the next step."""
        return self.step // self.steps_per_epoch

    @property
    def finished(self) -> bool:
        return self.stopped_early or self.step >= self.total_steps

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.data.train), self.config.seed, epoch)

    def step_examples(self, step: int) -> list[int]:
        """Indices of the training examples of 0-based step."""
        b = self.config.hyperparameters.batch_size
        within = step % self.steps_per_epoch
        return self.epoch_order(step // self.steps_per_epoch)[within * b:(within + 1) * b]

    def learning_rate(self, step: int) -> float:
        c = self.config
        return learning_rate_at(step, self.total_steps, c.hyperparameters.learning_rate, c.warmup_fraction,
                                c.min_lr_ratio)

    # -------------------------------------------------------------- segments

    def run_segment(self, *, max_steps: int | None = None, max_seconds: float | None = None,
                    should_stop: Callable[[], bool] | None = None) -> SegmentResult:
        """Steps until max_steps, max_seconds (checked between steps; at least one step runs), an epoch end,
        early stopping or the end of training; should_stop() is checked before every step (cancel)."""
        metrics: list[dict[str, Any]] = []
        start = time.perf_counter()
        taken = 0
        window_tokens, window_seconds = 0, 0.0
        epoch_completed = None
        cancelled = False
        while not self.finished:
            if should_stop is not None and should_stop():
                cancelled = True
                break
            if max_steps is not None and taken >= max_steps:
                break
            if max_seconds is not None and taken and time.perf_counter() - start >= max_seconds:
                break
            t0 = time.perf_counter()
            step_metrics, tokens = self._train_step()
            window_seconds += time.perf_counter() - t0
            window_tokens += tokens
            taken += 1
            epoch_end = self.step % self.steps_per_epoch == 0
            last = self.step == self.total_steps
            evaluate = epoch_end or last or bool(self.config.eval_every and self.step % self.config.eval_every == 0)
            if evaluate or self.step % self.config.log_every == 0:
                step_metrics["tokens_per_second"] = round(window_tokens / max(window_seconds, 1e-9), 1)
                window_tokens, window_seconds = 0, 0.0
                if evaluate and self.data.validation:
                    step_metrics |= self._validate(full=epoch_end or last)
                metrics.append(step_metrics)
            if epoch_end:
                epoch_completed = self.step // self.steps_per_epoch
                break
        return SegmentResult(metrics=metrics, step=self.step, total_steps=self.total_steps,
                             epoch_completed=epoch_completed, finished=self.finished,
                             stopped_early=self.stopped_early, cancelled=cancelled)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def _train_step(self) -> tuple[dict[str, Any], int]:
        """One optimizer step; returns its metrics and the tokens it ran."""
        step = self.step
        indices = self.step_examples(step)
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.method is Method.SUPERVISED:
            scores, tokens = self._sft_backward(indices)
        else:
            scores, tokens = self._dpo_backward(indices)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.adapters.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.trained_tokens += tokens
        metrics = {"step": self.step, "total_steps": self.total_steps, "epoch": step // self.steps_per_epoch + 1,
                   "learning_rate": lr, "grad_norm": round(float(grad_norm), 6), "trained_tokens": self.trained_tokens}
        return metrics | scores, tokens

    def _sft_backward(self, indices: list[int]) -> tuple[dict[str, Any], int]:
        sequences = [_chat_sequence(self.data.train[i]) for i in indices]
        denominator = sum(sum(mask[1:]) for _, mask in sequences)
        loss_sum, correct, tokens = 0.0, 0, 0
        for _, row in pack(sequences, self.row_tokens, self.device):
            with self._autocast():
                hidden = hidden_states(self.model, row, self.adapters, dropout_generator=self.dropout_generator)
                scores = token_scores(target_logprobs(self.model, hidden, row))
            (scores.loss_sum / denominator).backward()
            loss_sum += float(scores.loss_sum.detach())
            correct += scores.correct
            tokens += row.num_tokens
        return {"train_loss": loss_sum / denominator, "train_mean_token_accuracy": correct / denominator}, tokens

    def _pair_rows(self, examples: list[TokenizedPair]) -> list[tuple[list[int], PackedBatch]]:
        """Rows of whole pairs (a pair's two sequences share a row, so its loss is computed in one graph)."""
        lengths = [sum(sequence_lengths(e)) for e in examples]
        return [(row, pack_row([s for j in row for s in _pair_sequences(examples[j])], self.device))
                for row in plan_rows(lengths, self.row_tokens)]

    def _reference(self, examples: list[TokenizedPair], keys: list[str] | None) -> torch.Tensor:
        """[P, 2] reference (base model) log-probs of each pair's replies; with keys, each is computed once
        per run and kept in the state."""
        cached = {} if keys is None else self.reference_logprobs
        keys = keys if keys is not None else [str(j) for j in range(len(examples))]
        missing = [j for j, key in enumerate(keys) if key not in cached]
        if missing:
            with torch.no_grad(), self._autocast():
                for row, batch in self._pair_rows([examples[j] for j in missing]):
                    hidden = hidden_states(self.model, batch, None)  # adapters off: the frozen reference
                    logprobs = sequence_logprobs(target_logprobs(self.model, hidden, batch), batch).view(-1, 2)
                    for r, j in enumerate(row):
                        cached[keys[missing[j]]] = logprobs[r].tolist()
        return torch.tensor([cached[k] for k in keys], dtype=torch.float32, device=self.device)

    def _dpo_backward(self, indices: list[int]) -> tuple[dict[str, Any], int]:
        examples = [self.data.train[i] for i in indices]
        reference = self._reference(examples, [f"train:{i}" for i in indices])
        beta = self.config.hyperparameters.beta
        loss, correct, margin, chosen, rejected, tokens = 0.0, 0, 0.0, 0.0, 0.0, 0
        for row, batch in self._pair_rows(examples):
            with self._autocast():
                hidden = hidden_states(self.model, batch, self.adapters, dropout_generator=self.dropout_generator)
                policy = sequence_logprobs(target_logprobs(self.model, hidden, batch), batch).view(-1, 2)
            ref = reference[row]
            scores = preference_scores(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
            objective = scores.losses.sum()
            if self.config.chosen_nll_weight:  # RPO: + w * mean NLL of each chosen reply's tokens
                targets = torch.bincount(batch.target_sequence, minlength=batch.num_sequences).view(-1, 2)[:, 0]
                objective = objective + self.config.chosen_nll_weight * (-policy[:, 0] / targets.clamp(min=1)).sum()
            (objective / len(examples)).backward()
            loss += float(scores.losses.detach().sum())
            correct += int((scores.chosen_rewards > scores.rejected_rewards).sum())
            margin += float((scores.chosen_rewards - scores.rejected_rewards).sum())
            chosen += float(scores.chosen_rewards.sum())
            rejected += float(scores.rejected_rewards.sum())
            tokens += batch.num_tokens
        n = len(examples)
        return {"train_loss": loss / n, "train_reward_accuracy": correct / n, "train_reward_margin": margin / n,
                "train_chosen_reward": chosen / n, "train_rejected_reward": rejected / n}, tokens

    # -------------------------------------------------------------- validation

    def evaluate(self, examples: list | None = None) -> dict[str, float]:
        """Loss and accuracy of the adapted model on examples (default: the whole validation set):
        {"valid_loss", "valid_mean_token_accuracy"} for SFT, {"valid_loss", "valid_reward_accuracy",
        "valid_reward_margin"} for DPO; {} for no examples."""
        if examples is None:
            examples = self.data.validation
            return self._evaluate(examples, [f"valid:{j}" for j in range(len(examples))])
        return self._evaluate(examples, None)

    def _evaluate(self, examples: list, reference_keys: list[str] | None) -> dict[str, float]:
        if not examples:
            return {}
        with torch.no_grad(), self._autocast():
            if self.config.method is Method.SUPERVISED:
                loss_sum, correct, count = 0.0, 0, 0
                for _, row in pack([_chat_sequence(e) for e in examples], self.row_tokens, self.device):
                    hidden = hidden_states(self.model, row, self.adapters)
                    scores = token_scores(target_logprobs(self.model, hidden, row))
                    loss_sum += float(scores.loss_sum)
                    correct += scores.correct
                    count += scores.count
                return {"valid_loss": loss_sum / count, "valid_mean_token_accuracy": correct / count}
            reference = self._reference(examples, reference_keys)
            beta = self.config.hyperparameters.beta
            loss, correct, margin = 0.0, 0, 0.0
            for row, batch in self._pair_rows(examples):
                hidden = hidden_states(self.model, batch, self.adapters)
                policy = sequence_logprobs(target_logprobs(self.model, hidden, batch), batch).view(-1, 2)
                ref = reference[row]
                scores = preference_scores(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
                loss += float(scores.losses.sum())
                correct += int((scores.chosen_rewards > scores.rejected_rewards).sum())
                margin += float((scores.chosen_rewards - scores.rejected_rewards).sum())
            n = len(examples)
            return {"valid_loss": loss / n, "valid_reward_accuracy": correct / n, "valid_reward_margin": margin / n}

    def _validate(self, *, full: bool) -> dict[str, float]:
        """valid_* on the first eval_examples validation examples (early stopping follows valid_loss), plus
        full_valid_* on all of them when full."""
        subset = self.data.validation[: self.config.eval_examples]
        out = self._evaluate(subset, [f"valid:{j}" for j in range(len(subset))])
        if full:
            whole = out if len(subset) == len(self.data.validation) else self.evaluate()
            out |= {f"full_{k}": v for k, v in whole.items()}
        if out["valid_loss"] < self.best_valid_loss:
            self.best_valid_loss, self.evals_since_best = out["valid_loss"], 0
        else:
            self.evals_since_best += 1
        patience = self.config.early_stopping_patience
        if patience is not None and self.evals_since_best >= patience:
            self.stopped_early = True
            out["stopped_early"] = True
        return out

    # -------------------------------------------------------------- resumable state

    def _fingerprint(self) -> dict[str, Any]:
        """What a state must agree with to be resumed here: the config and the data's shape."""
        config = asdict(self.config)
        config["method"] = self.config.method.value
        return {"config": repr(sorted(config.items())), "train": len(self.data.train),
                "validation": len(self.data.validation), "total_steps": self.total_steps}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this trainer is (plain values and CPU tensors)."""
        return {
            "format": STATE_FORMAT, "fingerprint": self._fingerprint(), "step": self.step,
            "adapters": self.adapters.adapter_state_dict(), "optimizer": self.optimizer.state_dict(),
            "dropout_rng": self.dropout_generator.get_state(), "best_valid_loss": self.best_valid_loss,
            "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early,
            "trained_tokens": self.trained_tokens, "reference_logprobs": dict(self.reference_logprobs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a state_dict() of a trainer with the same config and data; raises ValueError otherwise."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown trainer state format {state.get('format')!r}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("the state belongs to a run with another config or other data")
        self.adapters.load_adapter_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dropout_generator.set_state(state["dropout_rng"])
        self.step = int(state["step"])
        self.best_valid_loss = float(state["best_valid_loss"])
        self.evals_since_best = int(state["evals_since_best"])
        self.stopped_early = bool(state["stopped_early"])
        self.trained_tokens = int(state["trained_tokens"])
        self.reference_logprobs = dict(state["reference_logprobs"])

    def state_bytes(self) -> bytes:
        """state_dict() serialised with torch.save (loadable with weights_only=True)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        self.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
