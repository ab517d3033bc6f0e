"""POST /v1/batches rejects bad input files synchronously: 400, the exact code, and the line number."""

from __future__ import annotations

import re

import openai
import pytest

from tests.api.conftest import SECOND_MODEL, chat_line, jsonl

CHAT = "/v1/chat/completions"


def create_with(client: openai.OpenAI, content: bytes, endpoint: str = CHAT, **kwargs):
    file_id = client.files.create(file=("in.jsonl", content), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h", **kwargs)


def without(line: dict, key: str) -> dict:
    return {k: v for k, v in line.items() if k != key}


def with_body(custom_id: str, **changes) -> dict:
    line = chat_line(custom_id)
    line["body"].update(changes)
    return line


BAD_FILES = {
    "not_jsonl": (b"sku,title\nA1,Chair\n", "invalid_json_line", 1, None),
    "not_utf8": (b"\xff\xfe\x00garbage\n", "invalid_file_format", 1, None),
    "bad_json_line": (jsonl([chat_line("a"), b'{"custom_id": "b",']), "invalid_json_line", 2, None),
    "json_not_object": (jsonl([[1, 2]]), "invalid_json_line", 1, None),
    "missing_custom_id": (jsonl([chat_line("a"), without(chat_line("b"), "custom_id")]),
                          "missing_required_parameter", 2, "custom_id"),
    "missing_method": (jsonl([without(chat_line("a"), "method")]), "missing_required_parameter", 1, "method"),
    "missing_url": (jsonl([without(chat_line("a"), "url")]), "missing_required_parameter", 1, "url"),
    "missing_body": (jsonl([without(chat_line("a"), "body")]), "missing_required_parameter", 1, "body"),
    "method_get": (jsonl([chat_line("a") | {"method": "GET"}]), "invalid_method", 1, "method"),
    "duplicate_custom_id": (jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), "duplicate_custom_id", 3,
                            "custom_id"),
    "url_mismatch": (jsonl([chat_line("a") | {"url": "/v1/completions"}]), "invalid_url", 1, "url"),
    "stream_true": (jsonl([chat_line("a"), with_body("b", stream=True)]), "unsupported_value", 2, "body.stream"),
    "unknown_model": (jsonl([chat_line("a", model="gpt-17")]), "model_not_found", 1, "body.model"),
    "missing_model": (jsonl([{**chat_line("a"), "body": {"messages": [{"role": "user", "content": "x"}]}}]),
                      "missing_required_parameter", 1, "body.model"),
    "max_tokens_zero": (jsonl([with_body("a", max_tokens=0)]), "invalid_value", 1, "body.max_tokens"),
    "max_tokens_beyond_context": (jsonl([chat_line("a"), chat_line("b", model=SECOND_MODEL, max_tokens=513)]),
                                  "invalid_value", 2, "body.max_tokens"),
    "max_completion_tokens_negative": (jsonl([with_body("a", max_completion_tokens=-1)]), "invalid_value", 1,
                                       "body.max_completion_tokens"),
    "temperature_high": (jsonl([with_body("a", temperature=2.5)]), "invalid_value", 1, "body.temperature"),
    "temperature_negative": (jsonl([with_body("a", temperature=-0.1)]), "invalid_value", 1, "body.temperature"),
    "top_p_zero": (jsonl([with_body("a", top_p=0)]), "invalid_value", 1, "body.top_p"),
    "n_seventeen": (jsonl([with_body("a", n=17)]), "invalid_value", 1, "body.n"),
    "five_stops": (jsonl([with_body("a", stop=["a", "b", "c", "d", "e"])]), "invalid_value", 1, "body.stop"),
    "empty_messages": (jsonl([with_body("a", messages=[])]), "invalid_value", 1, "body.messages"),
    "missing_messages": (jsonl([{**chat_line("a"), "body": {"model": chat_line("a")["body"]["model"]}}]),
                         "missing_required_parameter", 1, "body.messages"),
    "empty_file": (b"\n\n", "empty_file", None, None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_file(client: openai.OpenAI, case: str) -> None:
    content, code, line, param = BAD_FILES[case]
    with pytest.raises(openai.BadRequestError) as info:
        create_with(client, content)
    error = info.value.body
    assert info.value.status_code == 400
    assert (error["code"], error["line"], error["param"]) == (code, line, param)
    assert error["type"] == "invalid_request_error"
    if line is not None:
        assert f"Line {line}" in error["message"]
    assert error["errors"]["data"][0] == {"code": code, "message": error["errors"]["data"][0]["message"],
                                          "param": param, "line": line}
    assert client.batches.list().data == []  # nothing was created


# Every body parameter with values the request contract refuses (workers/batches/request_contract.py's table):
# each must be a 400 at create that names line 2 and the parameter, never an error line hours later.
INVALID_FIELDS = {
    "model": ["", 7, None],
    "max_tokens": [0, -1, 1.5, "8", True],
    "max_completion_tokens": [0, 2.0],
    "temperature": [-0.1, 2.01, "1", True, [1]],
    "top_p": [0, -0.5, 1.01, "0.9"],
    "top_k": [-1, 1.5, "4", False],
    "min_p": [-0.01, 1.5],
    "presence_penalty": [-2.5, 2.5, "0"],
    "frequency_penalty": [-3, 3],
    "repetition_penalty": [0, -1, 10.5],
    "seed": [2**64, -(2**63) - 1, 1.5, "42"],
    "stop": ["", [""], ["a", "b", "c", "d", "e"], [1], {"s": 1}],
    "n": [0, 17, 1.0, "1"],
    "stream": [True, "false"],
    "logprobs": [1, "yes"],
    "top_logprobs": [3, -1],
    "ignore_eos": [1, "true"],
    "metadata": [{"k": 1}, "x"],
    "user": [5],
    "messages": [[], "hi", [{"content": "no role"}], [{"role": "robot", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}]],
    "constraints": [{"preset": "tiktok"}, {"max_chars": 0}, {"banned": [""]}, {"min_words": 9, "max_words": 3},
                    "short", {"max_char": 30}, {"required": ["!"], "banned": ["!"]}],
    "response_format": [{"type": "xml"}, {"type": "json_schema"},
                        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
                        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/nowhere"}}}],
    "logit_bias": [{"a": 1}, {"5": 101}, [1]],
    "temprature": [0.5],  # a typo is an unknown parameter, not silently ignored
}
INVALID_CASES = [(name, value) for name, values in INVALID_FIELDS.items() for value in values]


@pytest.mark.parametrize(("name", "value"), INVALID_CASES, ids=[f"{n}={v!r}" for n, v in INVALID_CASES])
def test_every_invalid_parameter_is_refused_at_create(client: openai.OpenAI, name: str, value) -> None:
    line = chat_line("b")
    if value is None:
        del line["body"][name]
    else:
        line["body"][name] = value
    with pytest.raises(openai.BadRequestError) as info:
        create_with(client, jsonl([chat_line("a"), line]))
    error = info.value.body
    assert error["line"] == 2 and re.match(rf"body\.{name}($|\[|\.)", error["param"]), error
    assert error["message"].startswith("Line 2: ") and error["param"] in error["message"], error
    assert client.batches.list().data == []


def test_completions_prompt_required(client: openai.OpenAI) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": chat_line("a")["body"]["model"]}}
    with pytest.raises(openai.BadRequestError) as info:
        create_with(client, jsonl([line]), endpoint="/v1/completions")
    assert (info.value.body["code"], info.value.body["param"]) == ("missing_required_parameter", "body.prompt")


def test_every_error_is_listed(client: openai.OpenAI) -> None:
    lines = [chat_line("a"), b"nope", with_body("b", temperature=9), chat_line("a")]
    with pytest.raises(openai.BadRequestError) as info:
        create_with(client, jsonl(lines))
    listed = [(e["code"], e["line"]) for e in info.value.body["errors"]["data"]]
    assert listed == [("invalid_json_line", 2), ("invalid_value", 3), ("duplicate_custom_id", 4)]
    assert "2 more error(s)" in info.value.body["message"]


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"endpoint": "/v1/embeddings"}, "endpoint"),
    ({"completion_window": "2w"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
])
def test_bad_create_parameters(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    file_id = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch").id
    params = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"} | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(**params)
    assert info.value.body["param"].startswith(param) and info.value.body["code"] == "invalid_value"


def test_missing_input_file_id_is_400_not_422(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/batches", body={"endpoint": CHAT, "completion_window": "24h"}, cast_to=object)
    assert info.value.body["code"] == "missing_required_parameter" and info.value.body["param"] == "input_file_id"


def test_unknown_and_foreign_files_are_404(client: openai.OpenAI, session, api_key) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")
    from db.tenants import create_api_key, create_tenant

    other = create_tenant(session=session, name=f"other-{api_key[-8:]}")
    _, other_secret = create_api_key(session=session, tenant_id=other.id)
    session.commit()
    try:
        other_client = client.with_options(api_key=other_secret)
        foreign = other_client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        with pytest.raises(openai.NotFoundError) as info:
            client.batches.create(input_file_id=foreign.id, endpoint=CHAT, completion_window="24h")
        assert info.value.body["param"] == "input_file_id"
        for call in (client.files.retrieve, client.files.content, client.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(foreign.id)
        batch = other_client.batches.create(input_file_id=foreign.id, endpoint=CHAT, completion_window="24h")
        for call in (client.batches.retrieve, client.batches.cancel):
            with pytest.raises(openai.NotFoundError):
                call(batch.id)
        assert client.batches.list().data == [] and client.files.list().data == []
    finally:
        session.delete(other)
        session.commit()


def test_file_of_wrong_purpose(client: openai.OpenAI) -> None:
    file_id = client.files.create(file=("ft.jsonl", jsonl([chat_line("a")])), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert info.value.body["code"] == "invalid_file_purpose"


@pytest.mark.parametrize("content", [b"", b"null", b"[]"])
def test_body_that_is_not_an_object_is_400(http, api_key: str, content: bytes) -> None:
    response = http.post("/v1/batches", content=content,
                         headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_value" and error["param"] is None
    assert error["message"] == "The request body must be a JSON object."


def test_output_controls_are_accepted_at_create(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"headline": {"type": "string", "maxLength": 40}},
              "required": ["headline"]}
    batch = create_with(client, jsonl([
        with_body("variants", n=8, temperature=0.9, seed=3),
        with_body("brief", constraints={"min_words": 40, "max_words": 60, "banned": ["!"], "required": ["cotton"]}),
        with_body("headline", constraints={"preset": "google_ads_headline", "banned": ["acme"],
                                           "banned_case_insensitive": True}),
        with_body("json", response_format={"type": "json_schema", "json_schema": {"name": "ad", "schema": schema,
                                                                                   "strict": True}}),
        with_body("object", response_format={"type": "json_object"}, logit_bias={"13": -100}),
    ]))
    assert batch.request_counts.total == 5
