"""Publishing shard messages: a broker outage costs one failed publish, not one per shard."""

from __future__ import annotations

from kombu.exceptions import OperationalError

from genq.settings import Settings
from workers.celery_app import celery_app_for
from workers.dispatch import enqueue_shards


def test_enqueue_stops_at_the_first_broker_failure(monkeypatch, tmp_path):
    # Each failed publish retries for seconds (task_publish_retry_policy): trying every shard of a big
    # batch while Redis is down would hold the API's create-batch request for minutes. The shards left
    # unsent stay queued in SQL and the reaper re-sends them.
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'genq.db'}")
    calls: list[int] = []

    def down(_name, args, queue):
        calls.append(args[0])
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(celery_app_for(settings), "send_task", down)
    assert enqueue_shards(settings, [(1, "genq.m"), (2, "genq.m"), (3, "genq.m")]) == 0
    assert calls == [1]


def test_enqueue_sends_every_shard_when_the_broker_is_up(monkeypatch, tmp_path):
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'genq.db'}")
    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(celery_app_for(settings), "send_task", lambda _name, args, queue: sent.append((args[0], queue)))
    assert enqueue_shards(settings, [(1, "genq.a"), (2, "genq.b")]) == 2
    assert sent == [(1, "genq.a"), (2, "genq.b")]
