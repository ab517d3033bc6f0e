"""OpenAI bodies -> GenerationRequest, and results -> output lines."""

from __future__ import annotations

import pytest

from tests.workers.fake_model import FakeModel
from workers.batches.chat import (
    batch_error_line,
    build_request,
    output_line,
    request_error_line,
    response_body,
    stable_seed,
)
from workers.batches.request_contract import RequestError
from workers.runtime.types import GenerationResult

CHAT = "/v1/chat/completions"


def build(body, endpoint=CHAT, default_max_tokens=64, lm=None):
    return build_request(endpoint=endpoint, body=body, batch_id="batch_1", custom_id="req-1", lm=lm or FakeModel(),
                         default_max_tokens=default_max_tokens)


def test_sampling_fields_map_to_params():
    request = build({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5,
                     "frequency_penalty": -0.5, "repetition_penalty": 1.1, "seed": 7, "stop": "END",
                     "max_completion_tokens": 12, "logprobs": True, "ignore_eos": True})
    p = request.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.5, 0.9, 40, 0.05)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (p.seed, p.stop, p.max_tokens, p.logprobs, p.ignore_eos) == (7, ["END"], 12, True, True)
    assert request.request_id == "req-1"
    assert bytes(request.prompt_token_ids) == b"<system>be brief\n<user>hi\n<assistant>"


def test_defaults_seed_and_max_tokens():
    request = build({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request.params.seed == stable_seed("batch_1", "req-1") != stable_seed("batch_1", "req-2")
    assert request.params.max_tokens == 64 and request.params.temperature == 1.0
    # The default is capped by the context left after the prompt.
    prompt = len(request.prompt_token_ids)
    assert build({"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                 lm=FakeModel(context_length=prompt + 5)).params.max_tokens == 5


def test_completions_prompt_forms():
    endpoint = "/v1/completions"
    assert build({"model": "m", "prompt": "ab"}, endpoint).prompt_token_ids == [97, 98]
    assert build({"model": "m", "prompt": [5, 6]}, endpoint).prompt_token_ids == [5, 6]
    assert build({"model": "m", "prompt": ["ab"]}, endpoint).prompt_token_ids == [97, 98]
    with pytest.raises(RequestError) as err:
        build({"model": "m", "prompt": ["a", "b"]}, endpoint)
    assert err.value.param == "prompt"


@pytest.mark.parametrize("body, code, param", [
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "context_length_exceeded", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, "context_length_exceeded", "messages"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "unsupported_value",
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, "invalid_value", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "unsupported_value", "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "invalid_value", "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "invalid_value", "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "invalid_value", "max_tokens"),
])
def test_bad_bodies_are_request_errors(body, code, param):
    with pytest.raises(RequestError) as err:
        build({"model": "m", **body})
    assert (err.value.code, err.value.param, err.value.status_code) == (code, param, 400)


def test_lines_have_openai_shapes():
    result = GenerationResult(request_id="req-1", text="hello", token_ids=[104, 105], finish_reason="stop",
                              prompt_tokens=3, completion_tokens=2, logprobs=[-0.5, -1.0])
    body = response_body(endpoint=CHAT, body={"model": "m"}, batch_id="b", custom_id="req-1", result=result,
                         lm=FakeModel(), created=123)
    assert body["object"] == "chat.completion" and body["created"] == 123 and body["model"] == "m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"]] == ["h", "i"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    line = output_line(batch_id="b", custom_id="req-1", status_code=200, body=body)
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line == output_line(batch_id="b", custom_id="req-1", status_code=200, body=body)  # stable ids
    too_long = RequestError("too long", "context_length_exceeded", "messages")
    error = request_error_line(batch_id="b", custom_id="req-1", error=too_long, attempt=2, worker_id="host:1")
    assert error["response"]["status_code"] == 400 and error["error"] is None
    assert error["response"]["body"] == {"error": {"message": "too long", "type": "invalid_request_error",
                                                   "param": "messages", "code": "context_length_exceeded"}}
    assert error["genq"] == {"attempt": 2, "worker_id": "host:1"}
    expired = batch_error_line(batch_id="b", custom_id="req-1", code="batch_expired", message="late")
    assert expired["response"] is None and expired["error"] == {"code": "batch_expired", "message": "late"}


def test_a_message_without_content_is_empty_text_and_old_shards_keep_running():
    request = build({"model": "m", "messages": [{"role": "system"}, {"role": "user", "content": "hi"}],
                     "logit_bias": {"1": 5}})  # a field an older API stored; the worker drops it
    assert bytes(request.prompt_token_ids).decode() == "<system>\n<user>hi\n<assistant>"
