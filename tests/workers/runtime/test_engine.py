"""The engine on a tiny random model: continuous batching, prefix caching, preemption, chunked prefill,
seeds, stop strings, logits processors and per-request errors, each checked against running the
request alone."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.workers.runtime.tiny_checkpoints import EOS_ID, random_hf_state, tiny_hf_config, write_hf_dir
from workers.runtime.engine import Engine, EngineConfig
from workers.runtime.engine_loop import EngineLoop
from workers.runtime.errors import ContextLengthError, EngineFailure, GenerationFailedError, InvalidGenerationRequest
from workers.runtime.loader import LoadedModel, load_checkpoint
from workers.runtime.types import DecodingControls, GenerationRequest, SamplingParams

CONTEXT = 160


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> LoadedModel:
    config = tiny_hf_config("llama", context=CONTEXT)
    return load_checkpoint(write_hf_dir(tmp_path_factory.mktemp("engine") / "hf", config, random_hf_state(config, 3)))


def engine(lm: LoadedModel, **config) -> Engine:
    """A fresh engine on lm's weights; kv_blocks sizes the pool in blocks."""
    blocks = config.pop("kv_blocks", 256)
    block_size = config.get("block_size", 16)
    c = lm.config
    per_block = 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * 4
    return Engine(lm.model, lm.tokenizer, context_length=CONTEXT, cache_key="tiny",
                  config=EngineConfig(kv_cache_bytes=blocks * per_block, **config))


def req(rid: str, prompt: list[int], **params) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**params))


def mixed_requests(n: int, seed: int = 0, shared: int = 37) -> list[GenerationRequest]:
    """n greedy requests with a common prefix of `shared` tokens, then 1-60 own tokens, 1-40 new tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 250) for _ in range(shared)]
    return [req(f"r{i}", prefix + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 60))], temperature=0,
                max_tokens=rng.randrange(1, 40)) for i in range(n)]


@pytest.fixture(scope="module")
def alone_results(tiny_lm):
    """Each of the 64 mixed requests run by itself, in a fresh engine with no prefix caching."""
    results = {}
    for r in mixed_requests(64):
        [results[r.request_id]] = engine(tiny_lm, enable_prefix_caching=False).generate([r])
    return results


def assert_same_as_alone(results, alone_results):
    for r in results:
        alone = alone_results[r.request_id]
        assert (r.token_ids, r.finish_reason, r.text) == (alone.token_ids, alone.finish_reason, alone.text), \
            r.request_id


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_64_mixed_requests_equal_alone(tiny_lm, alone_results, prefix_caching):
    eng = engine(tiny_lm, enable_prefix_caching=prefix_caching, max_num_seqs=16, max_step_tokens=256)
    results = eng.generate(mixed_requests(64))
    assert [r.request_id for r in results] == [f"r{i}" for i in range(64)]
    assert_same_as_alone(results, alone_results)
    stats = eng.stats()
    assert stats.kv_usage == 0.0 and stats.running == stats.waiting == 0
    if prefix_caching:  # the 37 shared tokens hold 2 full blocks of 16: every request after the first hits
        assert stats.prefix_hit_rate > 0.2
    else:
        assert stats.prefix_hit_rate == 0.0


def test_preemption_by_a_tiny_cache_gives_the_same_tokens(tiny_lm, alone_results):
    eng = engine(tiny_lm, kv_blocks=20, block_size=8, max_num_seqs=8, max_step_tokens=64)  # 160 tokens
    results = eng.generate(mixed_requests(64))
    assert eng.stats().preemptions > 0
    assert_same_as_alone(results, alone_results)
    assert eng.kv.pool.num_free == eng.kv.pool.num_blocks
    assert all(b.ref_count == 0 for b in eng.kv.pool.blocks)


def test_chunked_prefill_of_a_long_prompt_beside_decodes(tiny_lm, alone_results):
    """A 7-token step budget cuts every prompt into chunks that run beside other requests' decodes."""
    eng = engine(tiny_lm, max_num_seqs=4, max_step_tokens=7)
    results = eng.generate(mixed_requests(64)[:12])
    assert_same_as_alone(results, alone_results)


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(tiny_lm):
    base = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=1234, ignore_eos=True)
    probe = GenerationRequest("probe", [7, 8, 9, 10], base)
    [alone] = engine(tiny_lm).generate([probe])
    others = [
        req("g", [40, 50, 60], temperature=0, max_tokens=5),
        req("p", [5], temperature=1.0, top_k=5, frequency_penalty=0.5, presence_penalty=0.3, seed=7),
        req("r", [200, 201, 202], temperature=0.7, min_p=0.1, repetition_penalty=1.3, max_tokens=20, seed=8),
        req("s", [33, 34], temperature=1.2, max_tokens=3, seed=9),
    ]
    mixed = engine(tiny_lm, max_num_seqs=3, max_step_tokens=5).generate([others[0], others[1], probe, *others[2:]])
    assert mixed[2].request_id == "probe" and mixed[2].token_ids == alone.token_ids
    [other_seed] = engine(tiny_lm).generate([dataclasses.replace(probe, params=dataclasses.replace(base, seed=99))])
    assert other_seed.token_ids != alone.token_ids


def test_penalised_request_same_alone_and_in_a_changing_batch(tiny_lm):
    probe = req("probe", [10, 20, 30, 40], temperature=0.8, seed=3, max_tokens=16, frequency_penalty=0.8,
                presence_penalty=0.5, repetition_penalty=1.4, ignore_eos=True)
    [alone] = engine(tiny_lm).generate([probe])
    others = [req(str(i), [i + 3] * (i + 1), temperature=0, max_tokens=2 + 3 * i, ignore_eos=True,
                  repetition_penalty=1.2 if i % 2 else 1.0) for i in range(4)]
    results = engine(tiny_lm, max_num_seqs=2).generate([others[0], probe, *others[1:]])
    assert results[1].token_ids == alone.token_ids


def test_eos_length_and_fields(tiny_lm):
    results = engine(tiny_lm).generate(mixed_requests(16, seed=5))
    for r in results:
        assert r.completion_tokens == len(r.token_ids) and r.error is None
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == EOS_ID
        else:
            assert EOS_ID not in r.token_ids
    [r] = engine(tiny_lm).generate([req("a", [1, 2, 3], temperature=0, max_tokens=9, logprobs=True,
                                        ignore_eos=True)])
    assert (r.finish_reason, r.prompt_tokens, r.completion_tokens, len(r.logprobs)) == ("length", 3, 9, 9)
    assert all(lp <= 0 for lp in r.logprobs) and r.text == tiny_lm.decode(r.token_ids)


def test_stop_string_cuts_text_and_frees_the_request(tiny_lm):
    eng = engine(tiny_lm)
    [free] = eng.generate([req("a", [40, 50, 60, 70], temperature=0, max_tokens=30, ignore_eos=True)])
    text = free.text
    assert len(text) >= 6
    stop = text[4:6]
    [cut] = eng.generate([req("a", [40, 50, 60, 70], temperature=0, max_tokens=30, ignore_eos=True,
                              stop=["\x00never", stop])])
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 30
    assert eng.kv.usage == 0.0 and not eng.has_unfinished()


def test_logits_processor_sees_each_step_and_masks_tokens(tiny_lm):
    seen: list[list[int]] = []

    def only_even(output_token_ids, logits):
        seen.append(list(output_token_ids))
        logits[1::2] = float("-inf")

    request = GenerationRequest("even", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                logits_processors=[only_even])
    plain = req("plain", [5, 6, 7], temperature=0, max_tokens=12, ignore_eos=True)
    even, other = engine(tiny_lm).generate([request, plain])
    assert all(t % 2 == 0 for t in even.token_ids) and any(t % 2 for t in other.token_ids)
    assert seen == [even.token_ids[:i] for i in range(12)]  # called once per step, fed back its tokens


def test_bad_requests_are_reported_per_request(tiny_lm):
    results = engine(tiny_lm).generate([req("empty", [], max_tokens=3), req("zero", [1], max_tokens=0),
                                        req("long", [1] * 150, max_tokens=20),
                                        req("ok", [1, 2], temperature=0, max_tokens=2)])
    assert isinstance(results[0].error, InvalidGenerationRequest) and "empty" in str(results[0].error)
    assert isinstance(results[1].error, InvalidGenerationRequest) and "max_tokens" in str(results[1].error)
    assert isinstance(results[2].error, ContextLengthError)
    assert results[3].error is None and results[3].completion_tokens == 2


def test_a_request_that_breaks_the_model_fails_alone(tiny_lm, monkeypatch):
    """A step that raises is rerun one request at a time: the culprit fails, the others finish unchanged."""
    requests = mixed_requests(6, seed=9)
    expected = engine(tiny_lm).generate(requests)
    poison = 251  # a token none of the requests uses
    bad = req("bad", [3, 4, poison, 5], temperature=0, max_tokens=4)
    eng = engine(tiny_lm)
    forward = eng.model.forward

    def crashing(batch, cache):
        if (batch.tokens == poison).any():
            raise RuntimeError("kernel fault")
        return forward(batch, cache)

    monkeypatch.setattr(eng.model, "forward", crashing)
    results = eng.generate([*requests[:3], bad, *requests[3:]])
    assert isinstance(results[3].error, GenerationFailedError) and "kernel fault" in str(results[3].error)
    assert [r.token_ids for r in results[:3] + results[4:]] == [r.token_ids for r in expected]
    assert eng.kv.usage == 0.0


def test_a_processor_that_cannot_be_built_fails_only_its_request(tiny_lm, monkeypatch):
    eng = engine(tiny_lm)

    def broken(controls):
        raise IndexError("a bug")

    monkeypatch.setattr(eng.controls, "processors", broken)
    controlled = dataclasses.replace(req("ctl", [1, 2], max_tokens=2), controls=DecodingControls(banned=["x"]))
    results = eng.generate([controlled, req("ok", [1, 2], temperature=0, max_tokens=2)])
    assert isinstance(results[0].error, InvalidGenerationRequest) and "IndexError" in str(results[0].error)
    assert results[1].error is None and results[1].completion_tokens == 2


def test_the_loop_fails_its_handles_rather_than_hang_when_adding_raises(tiny_lm, monkeypatch):
    eng = engine(tiny_lm)
    loop = EngineLoop(eng, name="test")
    monkeypatch.setattr(eng, "add_request", lambda *a: (_ for _ in ()).throw(KeyError("a bug")))
    handle = loop.submit([req("a", [1, 2], max_tokens=2)])
    with pytest.raises(EngineFailure, match="KeyError"):
        handle.results(timeout=10)
    monkeypatch.undo()
    later = loop.submit([req("b", [1, 2], temperature=0, max_tokens=2)])  # the loop goes on
    assert [r.completion_tokens for r in later.results(timeout=10)] == [2]
    loop.close()


def test_abort_releases_everything(tiny_lm):
    eng = engine(tiny_lm, max_num_seqs=4)
    for r in mixed_requests(10):
        eng.add_request(r.request_id, r)
    for _ in range(3):
        eng.step()
    assert eng.kv.usage > 0
    eng.abort([f"r{i}" for i in range(10)])
    assert not eng.has_unfinished() and eng.kv.usage == 0.0
    assert all(b.ref_count == 0 for b in eng.kv.pool.blocks)
    assert eng.step() == {}


def test_loaded_model_submit_runs_callers_together(tiny_lm):
    """Two submits to the shared engine loop: both finish, each gets only its own results."""
    first, second = mixed_requests(8, seed=1), mixed_requests(8, seed=2)
    a, b = tiny_lm.submit(first), tiny_lm.submit(second)
    got = {id(a): [], id(b): []}
    while not (a.done and b.done):
        for handle in (a, b):
            got[id(handle)] += handle.results(timeout=0.2)
    assert sorted(r.request_id for r in got[id(a)]) == sorted(r.request_id for r in first)
    assert sorted(r.request_id for r in got[id(b)]) == sorted(r.request_id for r in second)
    assert tiny_lm.engine.kv.usage == 0.0


def test_kv_pool_is_sized_from_the_byte_budget(tiny_lm):
    eng = engine(tiny_lm, kv_blocks=10)
    assert eng.kv.pool.num_blocks == 10 and eng.cache.k[0].shape[0] == 10
    assert torch.count_nonzero(eng.cache.k[0]) == 0
