"""A POST whose answer is lost is retried by the openai SDK: `genq submit` must still make one batch."""

from __future__ import annotations

import httpx
import openai
import pytest

from genq.cli import client as cli_client
from tests.api.conftest import chat_line, jsonl


class LoseFirstBatchAnswer(httpx.BaseTransport):
    """Runs every request, but drops the answer to the first POST /v1/batches (the server did create it)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/batches" and not self.lost:
            self.lost += 1
            response.read()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


@pytest.fixture
def retrying_client(http, api_key) -> openai.OpenAI:
    http._transport = LoseFirstBatchAnswer(http._transport)
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=2)


def test_sdk_without_a_key_makes_two_batches(retrying_client) -> None:
    """The failure genq submit guards against (so the test below can fail)."""
    file_id = retrying_client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch").id
    retrying_client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert len(retrying_client.batches.list().data) == 2


def test_genq_submit_makes_one_batch_when_an_answer_is_lost(retrying_client, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(cli_client, "_client", lambda: retrying_client)
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl([chat_line("a"), chat_line("b")]))
    cli_client.submit(path, endpoint=None, completion_window="24h", wait=False)
    batches = retrying_client.batches.list().data
    assert retrying_client._client._transport.lost == 1
    assert [b.id for b in batches] == [capsys.readouterr().out.strip()]
