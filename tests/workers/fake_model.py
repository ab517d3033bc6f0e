"""A fake loaded model with the runtime's interface: byte tokenizer, uniform logits, no torch.

Greedy (temperature 0) output is a fixed function of the prompt, sampled output a function of the seed,
so tests can compare runs. A prompt containing POISON raises inside generate (but only that request);
`step_delay` slows each decode step so a test can cancel mid-run.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from workers.runtime.types import GenerationRequest, GenerationResult

POISON = "POISON"


class FakeModel:
    def __init__(self, context_length: int = 256, step_delay: float = 0.0) -> None:
        self.context_length = context_length
        self.step_delay = step_delay
        self.generated: list[str] = []  # request ids in the order they were generated
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")

    def _complete(self, request: GenerationRequest) -> GenerationResult:
        params = request.params
        if params.temperature == 0:
            rng = random.Random(sum(request.prompt_token_ids))
        else:
            rng = random.Random(params.seed)
        tokens = [rng.randrange(97, 123) for _ in range(params.max_tokens)]
        return GenerationResult(
            request_id=request.request_id, text=self.decode(tokens), token_ids=tokens, finish_reason="length",
            prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(tokens),
            logprobs=[-3.2581] * len(tokens) if params.logprobs else None)

    def generate(self, requests: list[GenerationRequest], on_result: Callable[[GenerationResult], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, max_batch_size: int = 32) -> list[GenerationResult]:
        self.calls += 1
        results = []
        for start in range(0, len(requests), max_batch_size):
            chunk = requests[start:start + max_batch_size]
            if any(POISON.encode() in bytes(t for t in r.prompt_token_ids if t < 256) for r in chunk):
                raise RuntimeError("fake kernel crash")
            for request in chunk:
                if should_stop and should_stop():
                    return results
                if self.step_delay:
                    threading.Event().wait(self.step_delay)
                result = self._complete(request)
                self.generated.append(request.request_id)
                results.append(result)
                if on_result:
                    on_result(result)
        return results
