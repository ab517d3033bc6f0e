"""Input a hostile or broken client sends: always a 4xx with an OpenAI error body, never a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.api.conftest import chat_line, jsonl

CHAT = "/v1/chat/completions"


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def upload(http, auth, content: bytes, name: str = "in.jsonl"):
    return http.post("/v1/files", headers=auth, files={"file": (name, content)}, data={"purpose": "batch"})


def create(http, auth, file_id: str, **extra):
    return http.post("/v1/batches", headers=auth,
                     json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **extra})


def assert_openai_4xx(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


SURROGATE_LINE = json.dumps(chat_line("s")).replace('"content": "s"', '"content": "\\ud800"').encode()
DEEP_LINE = (b'{"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"x": '
             + b"[" * 5000 + b"]" * 5000 + b"}}")
BAD_LINES = {
    "nul_in_custom_id": (jsonl([chat_line("ok"), chat_line("a\x00b")]), 2, "custom_id"),
    "control_char_in_custom_id": (jsonl([chat_line("a\x1bb")]), 1, "custom_id"),
    "lone_surrogate_in_content": (jsonl([chat_line("ok"), SURROGATE_LINE]), 2, None),
    "nul_in_content": (jsonl([chat_line("ok"), chat_line("n") | {"body": chat_line("n")["body"]
                              | {"messages": [{"role": "user", "content": "a\x00b"}]}}]), 2, None),
    "nested_5000_deep": (jsonl([DEEP_LINE]), 1, None),
    "nested_40_deep": (jsonl([chat_line("d") | {"body": chat_line("d")["body"] | {"metadata": json.loads(
        "[" * 40 + "]" * 40)}}]), 1, None),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_unstorable_line_is_refused_naming_the_line(http, auth, case) -> None:
    """At upload when a streaming limit sees it (nesting), else at create."""
    content, line, param = BAD_LINES[case]
    uploaded = upload(http, auth, content)
    refused = uploaded if uploaded.status_code != 200 else create(http, auth, uploaded.json()["id"])
    error = assert_openai_4xx(refused)
    assert (error["line"], error["param"]) == (line, param if refused is not uploaded else "file")
    assert error["message"].startswith(f"Line {line}: ")
    assert http.get("/v1/batches", headers=auth).json()["data"] == []


@pytest.mark.parametrize("path", ["/v1/files/file-a%00b", "/v1/files/file-a%00b/content", "/v1/batches/batch_a%00",
                                  "/v1/batches/batch_%00/partial", "/v1/files/%ED%A0%80", "/v1/models/m%00"])
def test_nul_or_broken_utf8_in_an_id_is_400(http, auth, path) -> None:
    assert_openai_4xx(http.get(path, headers=auth))


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/batches/batch_%00/cancel"),
                                              ("POST", "/v1/batches/batch_%00/retry_failed"),
                                              ("DELETE", "/v1/files/file-%00")])
def test_nul_in_an_id_of_a_change_is_400(http, auth, method, path) -> None:
    assert_openai_4xx(http.request(method, path, headers=auth))


@pytest.mark.parametrize("query", ["after=%00", "after=batch_%00", "limit=%00", "limit=99999999999999999999",
                                   "after=%FF"])
@pytest.mark.parametrize("resource", ["batches", "files"])
def test_bad_query_values_are_400(http, auth, resource, query) -> None:
    assert_openai_4xx(http.get(f"/v1/{resource}?{query}", headers=auth))


@pytest.mark.parametrize("input_file_id", ["file-\x00", "\ud800"])
def test_unstorable_input_file_id_is_400(http, auth, input_file_id) -> None:
    body = json.dumps({"input_file_id": input_file_id, "endpoint": CHAT, "completion_window": "24h"})
    assert_openai_4xx(http.post("/v1/batches", headers=auth | {"Content-Type": "application/json"}, content=body))


@pytest.mark.parametrize("metadata", [{"k": "a\x00"}, {"k": "\ud800"}])
def test_unstorable_metadata_is_400(http, auth, metadata) -> None:
    file_id = upload(http, auth, jsonl([chat_line("a")])).json()["id"]
    body = json.dumps({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": metadata})
    assert_openai_4xx(http.post("/v1/batches", headers=auth | {"Content-Type": "application/json"}, content=body))
    assert http.get("/v1/batches", headers=auth).json()["data"] == []


def test_json_body_nested_thousands_deep_is_400(http, auth) -> None:
    body = b'{"input_file_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_4xx(http.post("/v1/batches", headers=auth | {"Content-Type": "application/json"}, content=body))


def test_oversized_json_body_is_413(http, auth) -> None:
    body = json.dumps({"input_file_id": "file-x", "metadata": {"k": "v" * (2 << 20)}})
    assert_openai_4xx(http.post("/v1/batches", headers=auth | {"Content-Type": "application/json"}, content=body),
                      status=413)


@pytest.mark.parametrize("name", ["x" * 513 + ".jsonl", "a\x01b.jsonl"])
def test_bad_upload_filename_is_400(http, auth, name) -> None:
    # httpx would percent-escape a control character; send the raw multipart body a hostile client would.
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n").encode() + jsonl([chat_line("a")]) + \
        f"\r\n--{boundary}--\r\n".encode()
    response = http.post("/v1/files", headers=auth | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                         content=body)
    assert assert_openai_4xx(response)["param"] == "file"
    assert http.get("/v1/files", headers=auth).json()["data"] == []


@pytest.mark.parametrize(("content", "code", "line"), [
    (jsonl([chat_line(f"r{i}") for i in range(51)]), "too_many_lines", 51),  # max_batch_requests is 50 here
    (jsonl([chat_line("a")]) + b'{"custom_id": "' + b"x" * (33 << 20) + b'"}\n', "line_too_long", 2),
    (jsonl([chat_line("a"), chat_line("b")]) + b"[" * 40 + b"]" * 40 + b"\n", "json_too_deep", 3),
])
def test_upload_limits_are_enforced_while_streaming(http, auth, settings, content, code, line) -> None:
    settings.max_file_bytes = 64 << 20
    error = assert_openai_4xx(upload(http, auth, content))
    assert (error["code"], error["line"], error["param"]) == (code, line, "file")
    assert error["message"].startswith(f"Line {line}: ")
    assert http.get("/v1/files", headers=auth).json()["data"] == []
    assert not list(Path(settings.storage_url).glob("files/*"))  # nothing of it was kept


def test_brackets_inside_strings_are_not_nesting(http, auth) -> None:
    line = chat_line("a")
    line["body"]["messages"][0]["content"] = "[" * 100 + "{" * 100
    assert upload(http, auth, jsonl([line])).status_code == 200


@pytest.mark.parametrize("content_type", [None, "application/merge-patch+json"])
def test_json_bodies_without_the_json_content_type_are_guarded_too(http, auth, content_type) -> None:
    body = b'{"input_file_id": "file-\\u0000", "endpoint": "/v1/chat/completions", "completion_window": "24h"}'
    headers = auth | ({"Content-Type": content_type} if content_type else {})
    response = http.post("/v1/batches", headers=headers, content=body)
    assert response.status_code < 500 and response.status_code != 200, response.text


def test_nesting_scan_is_linear_on_an_unterminated_string() -> None:
    import time as clock

    from api.upload_limits import nesting_depth

    line = b"[" * 40 + b'"' + b'\\"' * 200_000  # quadratic for a backtracking string pattern
    began = clock.perf_counter()
    assert nesting_depth(line) == 40
    assert clock.perf_counter() - began < 1.0
