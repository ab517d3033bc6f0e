"""Per-key rate limits and per-tenant queue caps, each refused with a 429 that names its numbers.

Rate: a fixed one-minute window per API key, counted in Redis (INCR + EXPIRE, one round trip) when
the deployment has a broker, so every API process shares it, else in this process. When Redis
cannot be reached the request is let through: the limit protects the service, it must not stop it.
Caps: requests not yet answered, and the tokens they may generate, in a tenant's queued and running
shards (db.batches.queued_work), checked when a batch is created.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from api.auth import KeyDep
from api.deps import SessionDep, SettingsDep
from api.errors import RateLimited
from db.batches import queued_work
from genq.settings import Settings

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


@dataclass(frozen=True)
class RateState:
    limit: int  # requests per window; 0 means no limit
    used: int  # in the current window, this request included
    reset_seconds: int  # until the window ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for requests."""
        return {"x-ratelimit-limit-requests": str(self.limit), "x-ratelimit-remaining-requests": str(self.remaining),
                "x-ratelimit-reset-requests": f"{self.reset_seconds}s"}


def _window() -> tuple[int, int]:
    """(the current window's number, whole seconds until it ends)."""
    now = time.time()
    window = int(now // WINDOW_SECONDS)
    return window, int((window + 1) * WINDOW_SECONDS - now) + 1


class RateLimiter:
    """Counts each key's requests in the current window (Redis if broker_url, else memory)."""

    def __init__(self, settings: Settings) -> None:
        self.limit = settings.rate_limit_requests_per_minute
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=0.5,
                                          socket_connect_timeout=0.5) if settings.broker_url else None
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: str) -> RateState:
        """Counts one request of key_id; raises RateLimited past the limit."""
        window, reset = _window()
        if self.limit <= 0:
            return RateState(0, 0, reset)
        used = self._count(key_id, window)
        state = RateState(self.limit, used, reset)
        if used > self.limit:
            raise RateLimited(f"Rate limit reached for this API key: {self.limit} requests per minute "
                              f"(this is request {used} of the current minute). Retry in {reset} s.",
                              retry_after=reset, code="rate_limit_exceeded")
        return state

    def peek(self, key_id: str) -> RateState:
        """The key's state without counting a request."""
        window, reset = _window()
        if self.redis is not None:
            try:
                used = int(self.redis.get(self._redis_key(key_id, window)) or 0)
            except redis.RedisError:
                used = 0
        else:
            with self._lock:
                used = self._counts.get((key_id, window), 0)
        return RateState(self.limit, used, reset)

    @staticmethod
    def _redis_key(key_id: str, window: int) -> str:
        return f"genq:rate:{key_id}:{window}"

    def _count(self, key_id: str, window: int) -> int:
        if self.redis is not None:
            try:
                pipe = self.redis.pipeline()
                pipe.incr(self._redis_key(key_id, window))
                pipe.expire(self._redis_key(key_id, window), WINDOW_SECONDS * 2)
                return int(pipe.execute()[0])
            except redis.RedisError as exc:
                log.warning("rate limiter: Redis unreachable, letting the request through: %s", exc)
                return 0
        with self._lock:
            for old in [k for k in self._counts if k[1] < window]:
                del self._counts[old]
            self._counts[(key_id, window)] = self._counts.get((key_id, window), 0) + 1
            return self._counts[(key_id, window)]


def check_queue_caps(*, session: Session, settings: Settings, tenant_id: str, requests: int, tokens: int) -> None:
    """Raises RateLimited when adding a batch of `requests` (that may generate `tokens`) would pass a cap."""
    queued_requests, queued_tokens = queued_work(session=session, tenant_id=tenant_id)
    caps = (("requests", queued_requests, requests, settings.max_queued_requests_per_tenant),
            ("tokens", queued_tokens, tokens, settings.max_queued_tokens_per_tenant))
    for what, queued, adding, cap in caps:
        if cap > 0 and queued + adding > cap:
            raise RateLimited(
                f"Queued {what} limit reached: this batch adds {adding} {what} to the {queued} your earlier "
                f"batches still have queued or running, past the cap of {cap} per tenant (GET /v1/genq/limits). "
                "Retry when some of them finish.", retry_after=60, code=f"queued_{what}_limit_exceeded",
                error_type=what, retry=False)


# --- GET /v1/genq/limits --------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/genq", tags=["limits"])


@router.get("/limits")
def show_limits(request: Request, key: KeyDep, session: SessionDep, settings: SettingsDep) -> dict:
    """The caller's limits and how much of each is in use (a genq extension), so nobody has to guess."""
    tenant_id, key_id = key
    rate = request.app.state.rate_limiter.peek(key_id)
    queued_requests, queued_tokens = queued_work(session=session, tenant_id=tenant_id)
    return {
        "object": "genq.limits",
        "requests_per_minute": {"limit": rate.limit, "used": rate.used, "remaining": rate.remaining,
                                "reset_seconds": rate.reset_seconds, "scope": "api_key"},
        "queued_requests": {"limit": settings.max_queued_requests_per_tenant, "used": queued_requests,
                            "scope": "tenant"},
        "queued_tokens": {"limit": settings.max_queued_tokens_per_tenant, "used": queued_tokens, "scope": "tenant"},
    }
