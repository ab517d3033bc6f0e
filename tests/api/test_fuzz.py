"""Property-based fuzzing of the batch-line validator and the request contract (hypothesis).

Whatever the bytes or JSON: no unhandled exception; the validator either accepts the file or raises
BatchInputInvalid whose every error names its line (file-wide errors excepted), and the contract
either returns a typed request or raises RequestError naming a parameter.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.batch_input import BatchInputInvalid, _ShardSpool, _validate_lines
from genq.settings import Settings
from workers.batches.request_contract import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    ParsedRequest,
    RequestError,
    parse_body,
)
from workers.registry import BUNDLED_MODEL_ID

SETTINGS = Settings(database_url="sqlite://", storage_url=tempfile.mkdtemp(), max_batch_requests=50)
FILE_WIDE = {"empty_file"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(
    alphabet=st.characters(codec=None), max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "stream",
          "logprobs", "top_logprobs", "ignore_eos", "user", "metadata", "echo", "temprature"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_values,
                                 "content": st.text(max_size=30) | json_values})
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8).flatmap(
    lambda extra: st.fixed_dictionaries({"model": st.just(BUNDLED_MODEL_ID) | json_values,
                                         "messages": st.lists(message, max_size=3) | json_values}).map(
        lambda base: {**base, **extra}))


def validate(data: bytes, endpoint: str = CHAT_ENDPOINT) -> None:
    with tempfile.TemporaryDirectory() as spool:
        writer = _ShardSpool(Path(spool), shard_size=4)
        try:
            _validate_lines(io.BytesIO(data), settings=SETTINGS, endpoint=endpoint, writer=writer)
        except BatchInputInvalid as exc:
            for error in exc.errors:
                assert error.line is not None or error.code in FILE_WIDE, error
                if error.line is not None:
                    assert error.message.startswith(f"Line {error.line}: "), error
        finally:
            writer.close_all()


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    validate(data)


@FUZZ
@given(st.lists(st.fixed_dictionaries({"custom_id": st.text(max_size=12) | json_values,
                                       "method": st.just("POST") | json_values,
                                       "url": st.just(CHAT_ENDPOINT) | json_values,
                                       "body": bodies | json_values}), min_size=1, max_size=6))
def test_arbitrary_request_lines(lines: list[dict]) -> None:
    validate(b"".join(json.dumps(line).encode() + b"\n" for line in lines))


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_lines(text: str) -> None:
    validate(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(bodies, st.sampled_from([CHAT_ENDPOINT, COMPLETIONS_ENDPOINT]))
def test_request_contract_types_or_names_the_parameter(body: dict, endpoint: str) -> None:
    try:
        parsed = parse_body(endpoint, body)
    except RequestError as error:
        assert error.param and error.code and error.message
        assert error.param.split("[")[0].split(".")[0] in body or error.code == "missing_required_parameter", error
        return
    assert isinstance(parsed, ParsedRequest) and parsed.model == body["model"]
    assert 0 <= parsed.params.temperature <= 2 and 0 < parsed.params.top_p <= 1
    assert parsed.params.seed is None or -(2**63) <= parsed.params.seed < 2**63


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@FUZZ
@given(json_values)
def test_upload_nesting_scan_matches_the_parsed_depth(value) -> None:
    from api.upload_limits import nesting_depth

    assert nesting_depth(json.dumps(value).encode()) == _depth(value)
    assert nesting_depth(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")) == _depth(value)
