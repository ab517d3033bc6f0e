"""OpenAI's fine-tuning hyperparameters, "auto" resolved from the data size. Torch-free (the API shows them).

Rules for "auto" (n = training examples after the validation split):
  n_epochs                  OpenAI's cookbook rule: 3, raised to min(25, 100 // n) when n * 3 < 100
                            examples seen, lowered to max(1, 25000 // n) when n * 3 > 25000.
  batch_size                ~0.2% of n, at least 1 and at most 256 (OpenAI's legacy guide).
  learning_rate_multiplier  0.05 below batch size 4, 0.1 up to 31, 0.2 from 32 (OpenAI's legacy guide:
                            "0.05, 0.1 or 0.2 depending on the final batch_size", larger with larger
                            batches). The learning rate is multiplier * BASE_LEARNING_RATE, so 0.1 is
                            2e-4, a usual LoRA learning rate.
  beta (DPO)                0.1, OpenAI's default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from workers.fine_tuning.data import Method

BASE_LEARNING_RATE = 2e-3  # AdamW peak learning rate at learning_rate_multiplier = 1
AUTO = "auto"
_TARGET_EPOCHS, _MIN_TARGET_EXAMPLES, _MAX_TARGET_EXAMPLES, _MAX_DEFAULT_EPOCHS = 3, 100, 25_000, 25


@dataclass(frozen=True)
class Hyperparameters:
    """What a job asks for (OpenAI's method.<type>.hyperparameters); each field may be "auto"."""

    n_epochs: int | Literal["auto"] = AUTO  # 1..50
    batch_size: int | Literal["auto"] = AUTO  # examples per optimizer step, 1..256
    learning_rate_multiplier: float | Literal["auto"] = AUTO  # > 0
    beta: float | Literal["auto"] = AUTO  # DPO only: (0, 2]

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            value = getattr(self, name)
            if value != AUTO and (isinstance(value, bool) or not ok):
                raise ValueError(f"hyperparameters.{name} must be \"auto\" or {rule}, got {value!r}")

        n, b, lr, beta = self.n_epochs, self.batch_size, self.learning_rate_multiplier, self.beta
        check("n_epochs", isinstance(n, int) and 1 <= n <= 50, "an integer in [1, 50]")
        check("batch_size", isinstance(b, int) and 1 <= b <= 256, "an integer in [1, 256]")
        check("learning_rate_multiplier", isinstance(lr, int | float) and lr > 0, "a number > 0")
        check("beta", isinstance(beta, int | float) and 0 < beta <= 2, "a number in (0, 2]")


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """Hyperparameters with every "auto" replaced by a value (what the job reports once it runs)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None  # None for supervised jobs

    @property
    def learning_rate(self) -> float:
        return self.learning_rate_multiplier * BASE_LEARNING_RATE

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def auto_n_epochs(n_examples: int) -> int:
    if n_examples * _TARGET_EPOCHS < _MIN_TARGET_EXAMPLES:
        return min(_MAX_DEFAULT_EPOCHS, _MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * _TARGET_EPOCHS > _MAX_TARGET_EXAMPLES:
        return max(1, _MAX_TARGET_EXAMPLES // n_examples)
    return _TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(256, round(0.002 * n_examples)))


def auto_learning_rate_multiplier(batch_size: int) -> float:
    return 0.05 if batch_size < 4 else 0.1 if batch_size < 32 else 0.2


def resolve_hyperparameters(requested: Hyperparameters, n_examples: int, method: Method | str
                            ) -> ResolvedHyperparameters:
    """requested with "auto" resolved for a training set of n_examples (see the module docstring)."""
    method = Method(method)
    n_epochs = auto_n_epochs(n_examples) if requested.n_epochs == AUTO else int(requested.n_epochs)
    batch_size = auto_batch_size(n_examples) if requested.batch_size == AUTO else int(requested.batch_size)
    lr = (auto_learning_rate_multiplier(batch_size) if requested.learning_rate_multiplier == AUTO
          else float(requested.learning_rate_multiplier))
    beta = None
    if method is Method.DPO:
        beta = 0.1 if requested.beta == AUTO else float(requested.beta)
    return ResolvedHyperparameters(n_epochs=n_epochs, batch_size=min(batch_size, n_examples),
                                   learning_rate_multiplier=lr, beta=beta)
