"""/v1/models: the base models this deployment serves (workers.registry) and the tenant's fine-tuned ones."""

from __future__ import annotations

from contextlib import suppress

from fastapi import APIRouter

from api.auth import TenantDep
from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import InvalidRequest, NotFound
from api.schemas import ModelDeleted, ModelList, ModelObject
from db.fine_tuning import delete_model, tenant_model
from storage import StorageError
from workers.registry import list_models, models_for_tenant

router = APIRouter(prefix="/v1", tags=["models"])


def _not_found(model_id: str) -> NotFound:
    return NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


@router.get("/models", response_model=ModelList)
def list_served_models(tenant_id: TenantDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    """Every model a batch line of this tenant may name (checkpoints are listed per job instead)."""
    specs = models_for_tenant(session, tenant_id, settings, checkpoints=False)
    return ModelList(data=[ModelObject.from_spec(spec) for spec in specs])


@router.get("/models/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep) -> ModelObject:
    """One model, or 404 model_not_found (also for another tenant's fine-tuned model)."""
    for spec in models_for_tenant(session, tenant_id, settings):
        if spec.id == model_id:
            return ModelObject.from_spec(spec)
    raise _not_found(model_id)


@router.delete("/models/{model_id:path}", response_model=ModelDeleted)
def remove_model(model_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
                 store: StoreDep) -> ModelDeleted:
    """Deletes the tenant's fine-tuned model and its adapter; base models cannot be deleted (400)."""
    row = tenant_model(session=session, tenant_id=tenant_id, model_id=model_id)
    if row is None:
        if any(spec.id == model_id for spec in list_models(settings)):
            raise InvalidRequest(f"'{model_id}' is a base model of this deployment; only fine-tuned models can "
                                 "be deleted", param="model", code="model_not_deletable")
        raise _not_found(model_id)
    keys = list(store.list_keys(row.adapter_key))
    delete_model(session=session, tenant_id=tenant_id, model_id=model_id)
    session.commit()
    for key in keys:  # the row is gone first: no row ever names a deleted adapter
        with suppress(StorageError):
            store.delete(key)
    return ModelDeleted(id=model_id)
