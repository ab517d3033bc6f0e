"""One engine fed by every shard a worker holds: shards of two batches run in it at once, results stay
exactly once per request, and cancelling one batch aborts only its requests (a real tiny model)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select

from db.batches import request_cancel
from db.models import Batch, BatchStatus, RequestOutcome, RequestResult
from db.session import session_scope
from tests.workers.conftest import chat_line
from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_hf_dir
from workers.batches.shard_runner import run_shard
from workers.runtime.engine import EngineConfig
from workers.runtime.loader import load_checkpoint


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    config = tiny_hf_config("llama", context=256)
    path = write_hf_dir(tmp_path_factory.mktemp("shared") / "hf", config, random_hf_state(config, 4))
    return load_checkpoint(path, engine_config=EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=64))


def _results(settings, batch_id) -> list[RequestResult]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(RequestResult).where(RequestResult.batch_id == batch_id)))


def _run_concurrently(settings, shard_ids, model, on_each_step=None):
    """Each shard on its own thread, as the worker's pool threads do; returns their outcomes."""
    outcomes = {}

    def one(shard_id):
        outcomes[shard_id] = run_shard(settings=settings, shard_id=shard_id, worker_id=f"w-{shard_id}",
                                       model_loader=lambda _m: model)

    threads = [threading.Thread(target=one, args=(s,)) for s in shard_ids]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_each_step:
            on_each_step()
        time.sleep(0.002)
    for t in threads:
        t.join()
    return outcomes


def test_shards_of_two_batches_share_one_engine(settings, make_batch, tiny_served):
    lines = [chat_line(f"r{i}", f"describe item {i}", max_tokens=40, ignore_eos=True) for i in range(8)]
    first, second = make_batch(lines), make_batch(lines)  # 2 shards of 4 each
    peak = [0]

    def watch():
        peak[0] = max(peak[0], tiny_served.engine.stats().running)

    outcomes = _run_concurrently(settings, first.shard_ids + second.shard_ids, tiny_served, watch)
    assert {o.status for o in outcomes.values()} == {"done"}
    assert peak[0] > settings.shard_size  # sequences of several shards (of both batches) ran together
    for made in (first, second):
        rows = _results(settings, made.batch_id)
        assert Counter(r.custom_id for r in rows) == Counter(f"r{i}" for i in range(8))  # exactly once
        assert all(r.outcome == RequestOutcome.SUCCEEDED and r.completion_tokens == 40 for r in rows)
        with session_scope(settings.database_url) as session:
            assert session.get(Batch, made.batch_id).status == BatchStatus.COMPLETED
    # Greedy: the same line gives the same text in either batch, whatever shared its steps.
    texts = [{r.custom_id: r.output_line["response"]["body"]["choices"][0]["message"]["content"]
              for r in _results(settings, m.batch_id)} for m in (first, second)]
    assert texts[0] == texts[1]
    assert tiny_served.engine.kv.usage == 0.0


def test_cancelling_one_batch_leaves_the_other_complete(settings, make_batch, tiny_served):
    lines = [chat_line(f"r{i}", f"write about {i}", max_tokens=120, ignore_eos=True) for i in range(8)]
    doomed, kept = make_batch(lines), make_batch(lines)
    with session_scope(settings.database_url) as session:
        tenant_id = session.get(Batch, doomed.batch_id).tenant_id
    cancelled = [False]

    def cancel_once_running():
        if not cancelled[0] and tiny_served.engine.stats().generated_tokens > 0:
            with session_scope(settings.database_url) as session:
                request_cancel(session=session, tenant_id=tenant_id, batch_id=doomed.batch_id)
            cancelled[0] = True

    outcomes = _run_concurrently(settings, doomed.shard_ids + kept.shard_ids, tiny_served, cancel_once_running)
    # A doomed shard either stopped midway or, claimed after the cancel, never started.
    doomed_statuses = [outcomes[s].status for s in doomed.shard_ids]
    assert "cancelled" in doomed_statuses and set(doomed_statuses) <= {"cancelled", "not_claimed"}
    assert [outcomes[s].status for s in kept.shard_ids] == ["done", "done"]
    kept_rows = _results(settings, kept.batch_id)
    assert Counter(r.custom_id for r in kept_rows) == Counter(f"r{i}" for i in range(8))
    assert all(r.completion_tokens == 120 for r in kept_rows)
    with session_scope(settings.database_url) as session:
        assert session.get(Batch, doomed.batch_id).status == BatchStatus.CANCELLED
        assert session.get(Batch, kept.batch_id).status == BatchStatus.COMPLETED
    doomed_rows = _results(settings, doomed.batch_id)
    assert Counter(r.custom_id for r in doomed_rows) == Counter(f"r{i}" for i in range(8))  # each answered once
    assert sum(r.outcome == RequestOutcome.SUCCEEDED for r in doomed_rows) < 8  # stopped midway
    assert tiny_served.engine.kv.usage == 0.0 and not tiny_served.engine.has_unfinished()
