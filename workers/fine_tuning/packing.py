"""Sequence packing: a step's sequences laid back to back in rows of at most `capacity` tokens, no padding.

A row is one flat run of tokens [T] with cu_seqlens marking where each sequence starts; positions
restart at 0 for every sequence and attention never crosses a boundary (train_forward.py), so a
sequence's logits do not depend on what it was packed with. Rows are filled first-fit decreasing:
the longest sequences first, each into the first row with room.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """One packed row: the tokens of several sequences and which of them are training targets."""

    tokens: torch.Tensor  # [T] int64: the sequences back to back
    positions: torch.Tensor  # [T] int64: index of each token in its own sequence (RoPE angle)
    cu_seqlens: torch.Tensor  # [S + 1] int64: sequence s is tokens[cu_seqlens[s]:cu_seqlens[s + 1]]
    seq_lengths: tuple[int, ...]  # [S] tokens of each sequence (host copy of the cu_seqlens differences)
    target_index: torch.Tensor  # [N] int64: tokens whose next token is a target (their logits are scored)
    target_ids: torch.Tensor  # [N] int64: that next token
    target_sequence: torch.Tensor  # [N] int64: the sequence each target belongs to
    num_sequences: int  # S

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most capacity tokens (first-fit decreasing, deterministic)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in rows of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(row) for row in rows]


def pack_row(sequences: list[tuple[tuple[int, ...], tuple[int, ...]]], device: torch.device | str = "cpu"
             ) -> PackedBatch:
    """A PackedBatch of (input ids, loss mask) sequences, in the order given."""
    tokens: list[int] = []
    positions: list[int] = []
    cu = [0]
    target_index: list[int] = []
    target_ids: list[int] = []
    target_sequence: list[int] = []
    for s, (ids, mask) in enumerate(sequences):
        base = len(tokens)
        tokens += ids
        positions += range(len(ids))
        cu.append(len(tokens))
        for t in range(1, len(ids)):
            if mask[t]:
                target_index.append(base + t - 1)  # the hidden state at t - 1 predicts token t
                target_ids.append(ids[t])
                target_sequence.append(s)
    def col(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return PackedBatch(
        tokens=col(tokens), positions=col(positions), cu_seqlens=col(cu),
        seq_lengths=tuple(len(ids) for ids, _ in sequences),
        target_index=col(target_index), target_ids=col(target_ids), target_sequence=col(target_sequence),
        num_sequences=len(sequences),
    )


def pack(sequences: list[tuple[tuple[int, ...], tuple[int, ...]]], capacity: int,
         device: torch.device | str = "cpu") -> list[tuple[list[int], PackedBatch]]:
    """(indices into sequences, their packed row) for every row of plan_rows."""
    plan = plan_rows([len(ids) for ids, _ in sequences], capacity)
    return [(row, pack_row([sequences[i] for i in row], device)) for row in plan]
