"""A fake served model with the runtime's interface (ServedModel): byte tokenizer, no torch.

Greedy (temperature 0) output is a fixed function of the prompt, sampled output a function of the seed,
so tests can compare runs. A prompt containing POISON fails alone with GenerationFailedError, as the
real engine reports a request that breaks the model; `step_delay` slows each request so a test can
cancel mid-run. Each submit runs on its own thread, like a shared engine serving several shards.
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Any

from workers.runtime.errors import GenerationFailedError
from workers.runtime.types import GenerationRequest, GenerationResult

POISON = "POISON"


class FakeHandle:
    """GenerationHandle of one submit: a thread completes the requests in order."""

    def __init__(self, model: FakeModel, requests: list[GenerationRequest]) -> None:
        self._left = len(requests)
        self._queue: queue.SimpleQueue[GenerationResult] = queue.SimpleQueue()
        self._aborted = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, requests), daemon=True)
        self._thread.start()

    def _run(self, model: FakeModel, requests: list[GenerationRequest]) -> None:
        for request in requests:
            if self._aborted.wait(model.step_delay) if model.step_delay else self._aborted.is_set():
                return
            with model.lock:
                model.generated.append(request.request_id)
            self._queue.put(model.complete(request))

    @property
    def done(self) -> bool:
        return self._aborted.is_set() or self._left == 0

    def results(self, timeout: float) -> list[GenerationResult]:
        out = []
        try:
            out.append(self._queue.get(timeout=timeout))
            while True:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        self._left -= len(out)
        return out

    def abort(self) -> None:
        self._aborted.set()


class FakeModel:
    def __init__(self, context_length: int = 256, step_delay: float = 0.0) -> None:
        self.context_length = context_length
        self.step_delay = step_delay
        self.generated: list[str] = []  # request ids in the order they were generated
        self.submits = 0
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")

    def complete(self, request: GenerationRequest) -> GenerationResult:
        params = request.params
        if POISON.encode() in bytes(t for t in request.prompt_token_ids if t < 256):
            return GenerationResult(request_id=request.request_id, text="", token_ids=[], finish_reason="length",
                                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=0,
                                    error=GenerationFailedError("the model failed on this request: fake crash"))
        rng = random.Random(sum(request.prompt_token_ids) if params.temperature == 0 else params.seed)
        tokens = [rng.randrange(97, 123) for _ in range(params.max_tokens)]
        return GenerationResult(
            request_id=request.request_id, text=self.decode(tokens), token_ids=tokens, finish_reason="length",
            prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(tokens),
            logprobs=[-3.2581] * len(tokens) if params.logprobs else None)

    def submit(self, requests: list[GenerationRequest]) -> FakeHandle:
        self.submits += 1
        return FakeHandle(self, requests)
