"""Batching, stopping, cancellation, seeds and detokenization of the generator on a tiny random model."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.workers.runtime.tiny_checkpoints import EOS_ID, random_hf_state, tiny_hf_config, write_hf_dir
from workers.runtime.loader import LoadedModel, load_checkpoint
from workers.runtime.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> LoadedModel:
    config = tiny_hf_config("llama", context=128)
    return load_checkpoint(write_hf_dir(tmp_path_factory.mktemp("gen") / "hf", config, random_hf_state(config, 3)))


def req(rid: str, prompt: list[int], **params) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**params))


PROMPTS = [[10, 20, 30], [40, 50, 60, 70, 80, 90, 100], [5], [200, 201, 202, 203], [33, 34]]


def test_length_and_fields(tiny_lm):
    [r] = tiny_lm.generate([req("a", PROMPTS[1], temperature=0, max_tokens=9, logprobs=True)])
    assert (r.request_id, r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("a", "length", 7, 9)
    assert len(r.token_ids) == 9 and len(r.logprobs) == 9 and all(lp <= 0 for lp in r.logprobs)
    assert r.error is None
    assert r.text == tiny_lm.decode(r.token_ids)


def test_batched_equals_alone_and_admission_beyond_batch_size(tiny_lm):
    """7 requests through 3 slots: every greedy result equals running it alone."""
    reqs = [req(str(i), PROMPTS[i % 5] + [i], temperature=0, max_tokens=4 + i) for i in range(7)]
    finished = []
    together = tiny_lm.generate(reqs, on_result=lambda r: finished.append(r.request_id), max_batch_size=3)
    assert [r.request_id for r in together] == [str(i) for i in range(7)]
    assert sorted(finished) == sorted(str(i) for i in range(7))
    for r, q in zip(together, reqs, strict=True):
        [alone] = tiny_lm.generate([q])
        assert r.token_ids == alone.token_ids and r.finish_reason == alone.finish_reason
        if r.finish_reason == "length":
            assert r.completion_tokens == 4 + int(q.request_id)
        else:  # eos ends it; the eos token is the last completion token and adds no text
            assert r.token_ids[-1] == EOS_ID and r.completion_tokens < 4 + int(q.request_id)
    cache = tiny_lm.generator._cache
    assert cache.allocator.num_free == cache.allocator.num_blocks  # every block came back


def test_seed_same_alone_and_in_mixed_batch(tiny_lm):
    base = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=1234)
    probe = GenerationRequest("probe", PROMPTS[0], base)
    [alone] = tiny_lm.generate([probe])
    others = [
        req("g", PROMPTS[1], temperature=0, max_tokens=5),
        req("p", PROMPTS[2], temperature=1.0, top_k=5, frequency_penalty=0.5, presence_penalty=0.3, seed=7),
        req("r", PROMPTS[3], temperature=0.7, min_p=0.1, repetition_penalty=1.3, max_tokens=20, seed=8),
        req("s", PROMPTS[4], temperature=1.2, max_tokens=3, seed=9),
    ]
    mixed = tiny_lm.generate([others[0], others[1], probe, others[2], others[3]], max_batch_size=4)
    assert mixed[2].request_id == "probe" and mixed[2].token_ids == alone.token_ids
    [other_seed] = tiny_lm.generate([dataclasses.replace(probe, params=dataclasses.replace(base, seed=99))])
    assert other_seed.token_ids != alone.token_ids


def test_penalties_change_output(tiny_lm):
    plain = tiny_lm.generate([req("a", PROMPTS[0], temperature=0, max_tokens=24)])[0]
    penalised = tiny_lm.generate([req("a", PROMPTS[0], temperature=0, max_tokens=24, frequency_penalty=2.0,
                                      repetition_penalty=1.5)])[0]
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert penalised.token_ids != plain.token_ids or len(set(plain.token_ids)) == 24


def test_stop_string_cuts_text(tiny_lm):
    free = tiny_lm.generate([req("a", PROMPTS[1], temperature=0, max_tokens=30)])[0]
    text = free.text
    assert len(text) >= 6
    stop = text[4:6]
    cut = tiny_lm.generate([req("a", PROMPTS[1], temperature=0, max_tokens=30, stop=["\x00never", stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 30


def test_should_stop_cancels_between_steps(tiny_lm):
    reqs = [req(str(i), PROMPTS[i % 5], temperature=0, max_tokens=5 if i == 0 else 60) for i in range(4)]
    done = []
    results = tiny_lm.generate(reqs, on_result=done.append, should_stop=lambda: len(done) > 0)
    assert [r.request_id for r in results] == ["0"]
    cache = tiny_lm.generator._cache
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_bad_requests_are_reported_per_request(tiny_lm):
    results = tiny_lm.generate([req("empty", [], max_tokens=3), req("zero", [1], max_tokens=0),
                                req("ok", [1, 2], temperature=0, max_tokens=2)])
    assert "empty" in results[0].error and "max_tokens" in results[1].error and results[2].error is None


def test_detokenizer_holds_back_partial_characters(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok.encode("é😀")  # byte-level: 2 + 4 single-byte tokens
    assert len(ids) == 6
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    assert pieces == ["", "é", "", "", "", "😀"]
    assert tok.decode(ids[:4]) == "é"  # an unfinished character is never emitted
    assert not math.isnan(len(tok.decode(ids)))


def test_a_failed_call_leaves_the_generator_usable(tiny_lm):
    def explode(result):
        raise RuntimeError("caller's callback failed")

    reqs = [req(str(i), PROMPTS[i], temperature=0, max_tokens=3 + 5 * i) for i in range(3)]
    with pytest.raises(RuntimeError, match="callback failed"):
        tiny_lm.generate(reqs, on_result=explode)
    again = tiny_lm.generate(reqs)
    assert [r.request_id for r in again] == ["0", "1", "2"] and all(r.error is None for r in again)


def test_forward_passes_host_max_lengths_to_the_kernels(tiny_lm, monkeypatch):
    """The attention launchers get the longest length from the host: no device read (a sync) per layer."""
    import kernels

    seen = []
    prefill, decode = kernels.prefill_attention, kernels.decode_attention

    def spy_prefill(*args, max_seqlen=None):
        cu = args[3]
        seen.append(("prefill", max_seqlen, int((cu[1:] - cu[:-1]).max())))
        return prefill(*args, max_seqlen=max_seqlen)

    def spy_decode(*args, max_seq_len=None):
        seen.append(("decode", max_seq_len, int(args[4].max())))
        return decode(*args, max_seq_len=max_seq_len)

    monkeypatch.setattr(kernels, "prefill_attention", spy_prefill)
    monkeypatch.setattr(kernels, "decode_attention", spy_decode)
    tiny_lm.generate([req("a", PROMPTS[1], temperature=0, max_tokens=3), req("b", PROMPTS[2], temperature=0,
                                                                            max_tokens=5, ignore_eos=True)])
    assert {kind for kind, _, _ in seen} == {"prefill", "decode"}
    assert all(given == actual for _, given, actual in seen), seen


def test_penalised_request_same_alone_and_as_its_batch_changes(tiny_lm):
    """Penalty counts kept on the device across steps equal counts rebuilt when rows are admitted or retire."""
    probe = req("probe", PROMPTS[1], temperature=0.8, seed=3, max_tokens=16, frequency_penalty=0.8,
                presence_penalty=0.5, repetition_penalty=1.4, ignore_eos=True)
    [alone] = tiny_lm.generate([probe])
    others = [req(str(i), PROMPTS[i], temperature=0, max_tokens=2 + 3 * i, ignore_eos=True,
                  repetition_penalty=1.2 if i % 2 else 1.0) for i in range(4)]
    results = tiny_lm.generate([others[0], probe, *others[1:]], max_batch_size=2)
    assert results[1].token_ids == alone.token_ids
