"""The one reader of the environment: every GENQ_* variable is a field of Settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".genq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    # Job state. Embedded default: a SQLite file under GENQ_HOME.
    database_url: str = ""
    # Celery broker. Empty means embedded mode: shards run in-process.
    broker_url: str = ""
    # "s3://BUCKET/PREFIX" or a local directory. Empty: GENQ_HOME/store.
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    home: Path = DEFAULT_HOME

    # Extra models: a JSON file mapping model id -> {"source": ..., "context_length": ...}.
    models_file: Path | None = None
    device: str = ""  # "" = cuda if available, else cpu
    dtype: str = ""  # "" = bfloat16 on cuda and on CPUs with bf16 matmuls (AVX512-BF16, AMX), else float32

    # Limits and batching.
    max_file_bytes: int = 200 * 1024 * 1024
    max_batch_requests: int = 50_000
    shard_size: int = 64  # requests per shard (one Celery task)
    # The engine (one per model per worker process, fed by every shard the worker holds):
    max_batch_size: int = 256  # sequences running together
    max_step_tokens: int = 2048  # tokens fed per engine step (decodes + prefill chunks)
    kv_cache_mb: int = 2048  # the KV-cache pool, allocated once per model
    kv_block_size: int = 32  # tokens per KV-cache block (the prefix-cache granularity); 32 measured faster than 16
    prefix_caching: bool = True  # share the KV blocks of common prompt prefixes
    worker_shards: int = 4  # shards one worker (or `genq run`) holds at once, all feeding its engine
    completion_window_default: str = "24h"
    # Leases fence every worker write; the reaper re-dispatches expired ones.
    lease_seconds: float = 120
    heartbeat_seconds: float = 20
    max_attempts: int = 3
    # One attempt at a shard may run this long (then it is released like a crash: retried or failed).
    # Keep it below visibility_timeout_seconds, or Redis redelivers the message of a shard still running.
    shard_time_limit_seconds: float = 2 * 3600
    # Fine-tunes train in segments of about this long, each ending with its state in storage: a killed
    # worker loses at most one segment, a cancel waits at most one training step.
    fine_tune_segment_seconds: float = 60
    fine_tune_time_limit_seconds: float = 24 * 3600  # one attempt's limit (released past it, like a crash)
    fine_tune_max_length: int = 2048  # tokens per training example (longer ones are truncated and counted)
    fine_tune_early_stopping_patience: int | None = 2  # epochs without a lower validation loss; None: off
    # A worker waits this long for unreachable storage (keeping its lease) before counting a crash.
    storage_outage_seconds: float = 900
    reaper_interval_seconds: float = 30
    visibility_timeout_seconds: int = 3 * 3600
    worker_soft_shutdown_seconds: float = 60.0
    # A queued shard untouched this long is re-sent by the reaper (its message may have been lost).
    queued_redispatch_seconds: float = 300
    # A batch left in "finalizing" this long (finalizer crashed) is finalized again by the reaper.
    finalizing_stale_seconds: float = 600
    # A finished batch is deleted (rows, shard inputs, output and error files) this long after it
    # finished; 0 keeps batches forever. Files go at their own expires_after.
    batch_retention_seconds: float = 30 * 86400
    # Per API key: requests per minute (0: no limit); counted in Redis when there is a broker, so every
    # API process shares the count. Per tenant: requests and tokens (the most they may generate) in
    # queued and running shards; a batch that would pass either cap is refused with a 429.
    rate_limit_requests_per_minute: int = 3000
    # An API process reuses a key's lookup this long: a revoked key is refused within it (0: at once).
    api_key_cache_seconds: float = 5.0
    max_queued_requests_per_tenant: int = 1_000_000
    max_queued_tokens_per_tenant: int = 1_000_000_000
    # max_tokens when a request names none: this, capped by what the context leaves after the prompt.
    default_max_tokens: int = 1024
    # Candidates drawn per choice of a line with constraints or a JSON schema before it fails with
    # constraints_not_met (each is a full generation: the bound on what a hard-to-meet line costs).
    max_candidates_per_choice: int = 8

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Where `genq submit/status/results` send requests, and with which key. GENQ_API_BASE and
    # GENQ_API_KEY win; OPENAI_BASE_URL and OPENAI_API_KEY (the SDK's own variables) are the fallback.
    api_base: str = ""
    api_key: str | None = Field(default=None, repr=False)
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    openai_api_key: str | None = Field(default=None, validation_alias="OPENAI_API_KEY", repr=False)
    # Optional bootstrap key for `genq api` in a fresh deployment (no default secret).
    bootstrap_api_key: str | None = Field(default=None, repr=False)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'genq.db'}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str(self.home / "store")

    def client_base_url(self) -> str:
        """The API base URL (ending in /v1) that genq's client commands use."""
        return self.api_base or self.openai_base_url or f"http://{self.api_host}:{self.api_port}/v1"

    def client_api_key(self) -> str | None:
        return self.api_key or self.openai_api_key


@lru_cache
def get_settings() -> Settings:
    return Settings()
