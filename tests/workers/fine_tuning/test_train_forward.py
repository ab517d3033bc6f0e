"""The training forward: the runtime's logits, no attention across packed sequences, gradients only in LoRA."""

from __future__ import annotations

import pytest
import torch

from tests.workers.runtime.forward import packed_logits
from workers.fine_tuning.lora import LoraAdapters, LoraConfig
from workers.fine_tuning.packing import pack, pack_row, plan_rows
from workers.fine_tuning.train_forward import all_logits, hidden_states, target_logprobs

SEQUENCES = [[5, 70, 71, 80, 90, 3, 4, 9, 10, 11, 200, 201, 30, 31, 32, 33, 34], [100, 12, 99, 7], [7], [1, 2, 3, 4, 5]]


def row(sequences: list[list[int]]):
    return pack_row([(tuple(s), (1,) * len(s)) for s in sequences])


def logits_per_sequence(model, sequences, adapters=None) -> list[torch.Tensor]:
    batch = row(sequences)
    with torch.no_grad():
        logits = all_logits(model, hidden_states(model, batch, adapters))
    cu = batch.cu_seqlens.tolist()
    return [logits[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]


def report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max {d.max():.2e} mean {d.mean():.2e}"


@pytest.mark.parametrize("sequences", [SEQUENCES[:1], SEQUENCES], ids=["one-sequence", "four-packed"])
def test_logits_equal_the_runtime_inference_forward(tiny_lm, sequences):
    ours = logits_per_sequence(tiny_lm.model, sequences)
    runtime = packed_logits(tiny_lm, sequences)  # the paged-KV inference forward
    for mine, ref in zip(ours, runtime, strict=True):
        assert (mine - ref).abs().max() < 1e-4, report(mine, ref)


def test_packed_sequences_do_not_see_each_other(tiny_lm):
    """Changing the first sequence (its tokens, its length) leaves the second one's logits as they were alone."""
    second = SEQUENCES[1]
    alone = logits_per_sequence(tiny_lm.model, [second])[0]
    for first in ([9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [200, 1], SEQUENCES[0]):
        packed = logits_per_sequence(tiny_lm.model, [first, second])[1]
        assert (packed - alone).abs().max() < 1e-5, report(packed, alone)
    after = logits_per_sequence(tiny_lm.model, [second, [3] * 30])[0]  # a longer neighbour after it, too
    assert (after - alone).abs().max() < 1e-5, report(after, alone)


def test_gradients_reach_only_the_adapters(tiny_lm):
    model = tiny_lm.model.requires_grad_(False)
    adapters = LoraAdapters(tiny_lm.config, LoraConfig(rank=4, alpha=8))
    batch = pack_row([(tuple(s), (0,) + (1,) * (len(s) - 1)) for s in SEQUENCES])
    loss = -target_logprobs(model, hidden_states(model, batch, adapters), batch).logprobs.mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    b_grads = [m.lora_B[t].grad for m in adapters.fused_loras() for t in m.targets]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)  # B = 0 at init: only B moves first
    assert len(b_grads) == 7 * tiny_lm.config.n_layers


@pytest.mark.parametrize("chunk", [4096, 64, 7])
def test_target_logprobs_and_their_gradient_equal_autograd_through_all_logits(tiny_lm, chunk):
    """The chunked output head with its folded-in Jacobian is log_softmax(W h)[target] and its true gradient."""
    batch = pack_row([(tuple(s), tuple(i % 2 for i in range(len(s)))) for s in SEQUENCES])
    with torch.no_grad():
        hidden = hidden_states(tiny_lm.model, batch)
    weights = torch.linspace(-1, 2, int(batch.target_ids.numel()))  # any upstream gradient
    h1 = hidden.clone().requires_grad_(True)
    target = target_logprobs(tiny_lm.model, h1, batch, chunk=chunk)
    (target.logprobs * weights).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    reference = all_logits(tiny_lm.model, h2).log_softmax(-1)[batch.target_index, batch.target_ids]
    (reference * weights).sum().backward()
    assert (target.logprobs - reference).abs().max() < 1e-5
    assert (h1.grad - h2.grad).abs().max() < 1e-5
    every = all_logits(tiny_lm.model, hidden)[batch.target_index]
    assert torch.equal(target.correct, every.argmax(-1) == batch.target_ids)
    ids = batch.tokens.tolist()
    assert batch.target_ids.tolist() == [ids[i + 1] for i in batch.target_index.tolist()]


def test_rows_are_planned_first_fit_decreasing_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 1]
    rows = plan_rows(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[2, 6], [0, 1], [4, 5], [3]] and plan_rows(lengths, 10) == rows
    with pytest.raises(ValueError):
        plan_rows([11], capacity=10)
    sequences = [((1,) * n, (1,) * n) for n in lengths]
    packed = pack(sequences, capacity=10)
    assert [r for r, _ in packed] == rows and [b.num_tokens for _, b in packed] == [10, 10, 10, 2]
    batch = packed[0][1]
    assert batch.positions.tolist() == list(range(9)) + [0] and batch.cu_seqlens.tolist() == [0, 9, 10]
    assert batch.target_sequence.tolist() == [0] * 8  # the 1-token sequence has nothing to predict
