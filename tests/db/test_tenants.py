from __future__ import annotations

from db.models import ApiKey
from db.tenants import (
    create_api_key,
    ensure_bootstrap_key,
    get_tenant,
    hash_secret,
    list_api_keys,
    revoke_api_key,
    tenant_for_key,
)


def test_key_round_trip(session, tenant) -> None:
    key, secret = create_api_key(session=session, tenant_id=tenant.id)
    session.commit()
    assert secret.startswith("sk-genq-") and len(secret) > 40
    stored = session.get(ApiKey, key.id)
    assert stored.key_hash == hash_secret(secret) and secret not in (stored.key_hash, stored.prefix)
    assert tenant_for_key(session=session, secret=secret).id == tenant.id
    assert tenant_for_key(session=session, secret=secret + "x") is None
    assert get_tenant(session=session, tenant=tenant.name).id == tenant.id


def test_revoke_by_id_and_prefix(session, tenant) -> None:
    first, first_secret = create_api_key(session=session, tenant_id=tenant.id)
    second, second_secret = create_api_key(session=session, tenant_id=tenant.id)
    assert revoke_api_key(session=session, key=first.id) == 1
    assert revoke_api_key(session=session, key=second.prefix) == 1
    assert revoke_api_key(session=session, key=second.prefix) == 0  # already revoked
    session.commit()
    assert tenant_for_key(session=session, secret=first_secret) is None
    assert tenant_for_key(session=session, secret=second_secret) is None
    assert all(k.revoked_at for k, _ in list_api_keys(session=session, tenant_id=tenant.id))
    assert [k.id for k, name in list_api_keys(session=session, prefix=second.prefix[:12])] == [second.id]
    assert {name for _, name in list_api_keys(session=session, tenant_id=tenant.id)} == {tenant.name}


def test_bootstrap_key_is_registered_once(session, tenant) -> None:
    secret = f"sk-genq-bootstrap-{tenant.id}"
    assert ensure_bootstrap_key(session=session, secret=secret, tenant_name=tenant.name).id == tenant.id
    assert ensure_bootstrap_key(session=session, secret=secret, tenant_name="other").id == tenant.id
    assert len(list_api_keys(session=session, tenant_id=tenant.id)) == 1
    revoke_api_key(session=session, key=list_api_keys(session=session, tenant_id=tenant.id)[0][0].id)
    ensure_bootstrap_key(session=session, secret=secret, tenant_name=tenant.name)
    assert tenant_for_key(session=session, secret=secret) is None  # revocation sticks
    session.commit()
