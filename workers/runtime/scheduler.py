"""The engine's scheduler: waiting and running queues keyed by request id, one step plan at a time.

vLLM v1's shape. `schedule()` returns a StepPlan: how many new tokens each request computes this step,
under a per-step token budget. Running requests come first, one token each for those decoding and the
next chunk for a prompt still prefilling; then waiting requests are admitted, taking their cached
prefix from the KV-cache manager and a chunk of their prompt that fits the budget (chunked prefill).
When a running request cannot get a block, the newest running request is preempted: its blocks are
freed and it goes back to the head of the waiting queue, to be recomputed (its tokens so far are
kept, and noise keyed on (seed, position) draws the same tokens again). `update(plan, sampled)` applies
a step's output: computed counts, newly full blocks into the prefix cache, the sampled tokens, and the
token-level stops (eos, max_tokens). Stop strings are the output processor's (it calls `finish`).

A step that raises turns every request in it into a suspect: suspects are then run one at a time,
alone in their steps, so that the request that breaks the model fails alone and the others finish.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from workers.runtime.kv_cache_manager import KVCacheManager
from workers.runtime.types import GenerationRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """A request inside the engine: its tokens, how many have K/V in the cache, where it stands."""

    request_id: str  # the engine's key (unique among everything the engine holds)
    request: GenerationRequest
    cache_key: str  # model and adapter: part of every prefix hash
    token_ids: list[int] = field(default_factory=list)  # prompt, then the completion so far
    num_computed_tokens: int = 0  # leading tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" (eos) or "length", set by update
    suspect: bool = False  # was in a step that raised: runs alone from now on

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed, num_computed + num_new) are fed."""

    request: EngineRequest
    num_computed: int  # tokens already cached before this step (the new tokens' first position)
    num_new: int  # tokens fed this step (1 for a decode)

    @property
    def samples(self) -> bool:
        """This step reaches the end of the request's known tokens, so its last logits draw the next one."""
        return self.num_computed + self.num_new == len(self.request.token_ids)


@dataclass
class StepPlan:
    """What one engine step runs."""

    scheduled: list[ScheduledRequest]  # in the order the scheduler chose them
    preempted: list[str] = field(default_factory=list)  # request ids preempted while planning
    isolated: bool = False  # a suspect alone


@dataclass
class TokenEvent:
    """A token drawn for a request in one step, and whether it finished the request."""

    request_id: str
    token_id: int
    logprob: float | None
    finish_reason: str | None  # "stop" (eos) or "length" when this token ends the request


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # requests running at once
    max_step_tokens: int = 2048  # tokens fed per step: decodes + prefill chunks


class Scheduler:
    """Owns the queues; the engine calls schedule(), runs the plan, then update(plan, sampled)."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_ids: frozenset[int]) -> None:
        self.config = config
        self.kv = kv
        self.eos_ids = eos_ids
        self.requests: dict[str, EngineRequest] = {}
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # admission order: the last is preempted first
        self.num_preemptions = 0

    # -- queues ----------------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, reason: str | None = None) -> EngineRequest | None:
        """Removes a request (finished, stopped by the output processor, or aborted) and frees its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = request.finish_reason or reason
        self.kv.free(request_id)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _preempt(self, request: EngineRequest) -> None:
        """Frees the request's blocks and puts it at the head of the waiting queue, to be recomputed."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def make_suspects(self, plan: StepPlan) -> None:
        """The plan's step raised: preempt its requests and mark them to run alone."""
        for scheduled in plan.scheduled:
            request = scheduled.request
            if request.status is RequestStatus.RUNNING:
                self._preempt(request)
            request.suspect = True

    # -- planning --------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        suspects = [r for r in self.requests.values() if r.suspect]
        if suspects:
            return self._schedule_alone(suspects[0])
        budget = self.config.max_step_tokens
        plan = StepPlan([])
        for request in list(self.running):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted for an earlier request this step
                continue
            num_new = min(len(request.token_ids) - request.num_computed_tokens, budget)
            if not self._grow(request, num_new, plan):
                continue
            plan.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_new))
            budget -= num_new
        if plan.preempted:  # the pool is full: admitting more would only preempt again
            return plan
        # First prompt blocks that a running request is still computing: a waiting request that opens with
        # the same block waits a step for the cache instead of computing it too (n choices of one prompt,
        # a batch's shared system prompt).
        computing = {self._first_block(r) for r in self.running if r.num_computed_tokens < r.num_prompt_tokens}
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv.find_prefix(request.request_id, request.token_ids, request.cache_key)
            first = self._first_block(request)
            if prefix.num_tokens == 0 and first is not None and first in computing:
                break
            num_new = min(len(request.token_ids) - prefix.num_tokens, budget)  # the rest in later chunks
            if not self.kv.allocate_slots(request.request_id, prefix.num_tokens + num_new, prefix):
                break
            self.waiting.popleft()
            request.num_computed_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.scheduled.append(ScheduledRequest(request, prefix.num_tokens, num_new))
            budget -= num_new
            if prefix.num_tokens == 0:
                computing.add(first)
        return plan

    def _first_block(self, request: EngineRequest) -> tuple | None:
        """The key of a request's first full prompt block (None when its prompt is shorter, or without
        prefix caching)."""
        bs = self.kv.block_size
        if not self.kv.enable_prefix_caching or request.num_prompt_tokens < bs:
            return None
        return request.cache_key, tuple(request.token_ids[:bs])

    def _grow(self, request: EngineRequest, num_new: int, plan: StepPlan) -> bool:
        """Blocks for num_new more tokens of a running request, preempting the newest running requests
        until they fit; False when the request itself had to be preempted."""
        while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_alone(self, request: EngineRequest) -> StepPlan:
        """A step of one suspect request, with the whole budget; others keep their blocks and wait."""
        plan = StepPlan([], isolated=True)
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            request.num_computed_tokens = 0
        num_new = min(len(request.token_ids) - request.num_computed_tokens, self.config.max_step_tokens)
        while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
            victim = next(r for r in reversed(self.running) if r is not request)  # the pool fits any one request
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
        plan.scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_new))
        return plan

    # -- applying a step's output ----------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: dict[str, tuple[int, float | None]]) -> list[TokenEvent]:
        """Advances every scheduled request by its fed tokens and appends its sampled token (request id ->
        (token, logprob)); requests that reach eos or max_tokens finish and free their blocks."""
        events = []
        for scheduled in plan.scheduled:
            request = scheduled.request
            if request.status is not RequestStatus.RUNNING:  # aborted meanwhile
                continue
            request.num_computed_tokens = scheduled.num_computed + scheduled.num_new
            self.kv.cache_full_blocks(request.request_id, request.token_ids, request.num_computed_tokens,
                                      request.cache_key)
            drawn = sampled.get(request.request_id)
            if drawn is None:  # a prefill chunk that did not reach the prompt's end
                continue
            token, logprob = drawn
            request.token_ids.append(token)
            params = request.request.params
            reason = None
            if token in self.eos_ids and not params.ignore_eos:
                reason = "stop"
            elif request.num_output_tokens >= params.max_tokens:
                reason = "length"
            events.append(TokenEvent(request.request_id, token, logprob, reason))
            if reason is not None:
                request.finish_reason = reason
                request.suspect = False
                self.finish(request.request_id)
        return events
