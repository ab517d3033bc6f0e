"""/v1/models: the models this deployment serves (workers.registry), as OpenAI model objects."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import TenantDep
from api.deps import SettingsDep
from api.errors import NotFound
from api.schemas import ModelList, ModelObject
from workers.registry import UnknownModelError, get_model, list_models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
def list_served_models(_tenant_id: TenantDep, settings: SettingsDep) -> ModelList:
    """Every model a batch line may name."""
    return ModelList(data=[ModelObject.from_spec(spec) for spec in list_models(settings)])


@router.get("/models/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, _tenant_id: TenantDep, settings: SettingsDep) -> ModelObject:
    """One model, or 404 model_not_found."""
    try:
        return ModelObject.from_spec(get_model(model_id, settings))
    except UnknownModelError:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found") from None
