"""Serving a fine-tuned model: its base checkpoint with the LoRA adapter merged into a copy of the weights.

A merged copy per fine-tuned model (not per-request adapters inside one engine batch): the engine, its
fused kernels and its prefix cache run unchanged, at the base model's speed, for the price of one more
copy of the weights per fine-tuned model a worker has loaded (the loader's cache holds a few). The
adapter comes from storage (PEFT layout, written by the trainer); the row that names it from SQL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from db.fine_tuning import any_model
from db.session import session_scope
from genq.settings import Settings
from storage import store_from_settings
from workers.fine_tuning.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapter, merge_into
from workers.registry import ModelSpec, get_model
from workers.runtime.checkpoint import Checkpoint
from workers.runtime.errors import ModelLoadError
from workers.runtime.export import write_hf_dir
from workers.runtime.loader import (
    LoadedModel,
    engine_config,
    read_checkpoint,
    resolve_device,
    resolve_dtype,
    resolve_source,
    serve_checkpoint,
)
from workers.runtime.weights import fuse_projections, unfuse_projections

log = logging.getLogger(__name__)


def adapter_bytes(settings: Settings, adapter_key: str) -> dict[str, bytes]:
    """The adapter's files (adapter_model.safetensors, adapter_config.json) from storage."""
    store = store_from_settings(settings)
    return {name: store.get_bytes(f"{adapter_key}{name}") for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)}


def merged_weights(model_id: str, settings: Settings, tenant_id: str | None = None
                   ) -> tuple[Checkpoint, dict[str, torch.Tensor], ModelSpec]:
    """(base checkpoint, fused weights with the adapter merged, base spec) of a fine-tuned model; with
    tenant_id, only that tenant's model is found."""
    with session_scope(settings.resolved_database_url()) as session:
        row = any_model(session=session, model_id=model_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise ModelLoadError(model_id, "no such fine-tuned model (deleted?)")
        if row.image_spec is not None:
            raise ModelLoadError(model_id, "an image model (GAN or VAE), not a language model: it is sampled "
                                           "through /v1/images/generations lines and has no merged weights")
        base_model, adapter_key = row.base_model, row.adapter_key
    base = get_model(base_model, settings)
    checkpoint = read_checkpoint(resolve_source(base.source, settings))
    adapters = load_adapter(adapter_bytes(settings, adapter_key), checkpoint.config)
    return checkpoint, merge_into(fuse_projections(checkpoint.tensors, checkpoint.config), adapters), base


def export_merged(model_id: str, directory: str | Path, settings: Settings, tenant_id: str | None = None) -> Path:
    """Writes the fine-tuned model, adapter merged, as a Hugging Face safetensors directory."""
    checkpoint, state, _ = merged_weights(model_id, settings, tenant_id)
    return write_hf_dir(checkpoint, unfuse_projections(state, checkpoint.config), directory)


def load_fine_tuned_model(model_id: str, settings: Settings) -> LoadedModel:
    """The fine-tuned model (or checkpoint) model_id on settings' device and dtype, weights merged."""
    checkpoint, state, base = merged_weights(model_id, settings)
    device = resolve_device(settings)
    log.info("loading fine-tuned model %s (base %s) on %s", model_id, base.id, device)
    return serve_checkpoint(checkpoint, state, device=device, dtype=resolve_dtype(settings, device), model_id=model_id,
                            context_length=base.context_length, engine_config=engine_config(settings))
