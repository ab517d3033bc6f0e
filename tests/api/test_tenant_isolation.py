"""No tenant reads, changes or learns the existence of another's objects, on every route of the app.

Routes come from the app's OpenAPI schema, so a route added later is covered without editing this
test; a new kind of id in a path must be named below (owned, or shared by every tenant) or the test
fails, which is the point: someone has to decide.
"""

from __future__ import annotations

import pytest

from db.tenants import create_api_key, create_tenant
from tests.api.conftest import chat_line, jsonl, sft_lines

OWNED = {"file_id": "file", "batch_id": "batch", "input_file_id": "file", "job_id": "fine_tune",
         "training_file": "tuning_file", "validation_file": "tuning_file"}  # id name -> kind of object
# Base models are every tenant's; fine-tuned ones are owned (tests/api/test_fine_tuning.py checks those).
SHARED = {"model_id"}
PUBLIC = {("GET", "/health")}
MISSING = {"file": "file-000000000000000000000000", "batch": "batch_000000000000000000000000",
           "fine_tune": "ftjob-000000000000000000000000", "tuning_file": "file-000000000000000000000001"}


@pytest.fixture
def other(session, http):
    """Another tenant with a file and a batch of its own."""
    tenant = create_tenant(session=session, name=f"other-{id(session)}")
    _, secret = create_api_key(session=session, tenant_id=tenant.id)
    session.commit()
    auth = {"Authorization": f"Bearer {secret}"}
    file_id = http.post("/v1/files", headers=auth, files={"file": ("in.jsonl", jsonl([chat_line("a")]))},
                        data={"purpose": "batch"}).json()["id"]
    batch_id = http.post("/v1/batches", headers=auth, json={"input_file_id": file_id, "endpoint":
                         "/v1/chat/completions", "completion_window": "24h"}).json()["id"]
    tuning_file = http.post("/v1/files", headers=auth, files={"file": ("train.jsonl", jsonl(sft_lines(10)))},
                            data={"purpose": "fine-tune"}).json()["id"]
    job = http.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "smollm2-135m-instruct",
                                                                  "training_file": tuning_file})
    assert job.status_code == 200, job.text
    yield {"file": file_id, "batch": batch_id, "auth": auth, "tuning_file": tuning_file, "fine_tune": job.json()["id"]}
    session.delete(tenant)
    session.commit()


def routes(app):
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if (method.upper(), path) not in PUBLIC:
                yield method.upper(), path, operation


def _fill(path: str, operation: dict, ids: dict[str, str]) -> str | None:
    """path with every id parameter set from ids; None when it names only shared objects."""
    names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
    for name in names:
        assert name in OWNED or name in SHARED, f"{path}: whose objects does {{{name}}} name? Add it to OWNED or SHARED"
    if not any(name in OWNED for name in names):
        return None
    for name in names:
        path = path.replace(f"{{{name}}}", ids[OWNED[name]] if name in OWNED else "smollm2-135m-instruct")
    return path


def _body(operation: dict, ids: dict[str, str], schemas: dict) -> dict | None:
    """A JSON body naming ids in every *_id field the route's schema has, the other fields it needs set."""
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None
    fields = schemas[content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]
    body = {"endpoint": "/v1/chat/completions", "completion_window": "24h", "model": "smollm2-135m-instruct",
            "ratings": [{"custom_id": "a", "rating": "good"}], "format": "dpo"}
    body |= {name: ids[OWNED[name]] for name in OWNED}
    return {name: value for name, value in body.items() if name in fields}


def test_another_tenants_ids_are_404_on_every_route(app, http, api_key, other) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    checked = 0
    schemas = app.openapi()["components"]["schemas"]
    for method, template, operation in routes(app):
        path = _fill(template, operation, other)
        body = _body(operation, other, schemas)
        if path is None and body is None:
            continue
        path = path or template
        foreign = http.request(method, path, headers=auth, json=body)
        missing = http.request(method, _fill(template, operation, MISSING) or template, headers=auth,
                               json=_body(operation, MISSING, schemas))
        assert foreign.status_code == 404, f"{method} {path}: {foreign.status_code} {foreign.text[:200]}"
        error = foreign.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == missing.json()["error"]["code"]
        assert missing.status_code == 404  # the same answer as for an id that exists nowhere
        checked += 1
    assert checked >= 7  # files: retrieve, delete, content; batches: create, retrieve, cancel, partial, retry
    # The other tenant's objects are untouched: its batch still runs, its file is still there.
    assert http.get(f"/v1/batches/{other['batch']}", headers=other["auth"]).json()["status"] == "in_progress"
    assert http.get(f"/v1/files/{other['file']}", headers=other["auth"]).status_code == 200


def test_lists_and_cursors_show_nothing_of_another_tenant(app, http, api_key, other) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    for method, path, operation in routes(app):
        if method != "GET" or "{" in path:
            continue
        listed = http.get(path, headers=auth)
        assert listed.status_code == 200, path
        assert other["file"] not in listed.text and other["batch"] not in listed.text, path
        query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if "after" in query:  # a cursor naming another tenant's object answers as one naming nothing
            kind = "batch" if "batches" in path else "file"
            foreign = http.get(path, headers=auth, params={"after": other[kind]})
            unknown = http.get(path, headers=auth, params={"after": MISSING[kind]})
            assert (foreign.status_code, foreign.json()) == (unknown.status_code, unknown.json()), path


def test_every_route_but_health_requires_a_key(app, http) -> None:
    for method, path, _operation in routes(app):
        concrete = path.replace("{file_id}", "file-x").replace("{batch_id}", "batch_x").replace("{model_id}", "m")
        response = http.request(method, concrete)
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert response.json()["error"]["code"] == "invalid_api_key"
