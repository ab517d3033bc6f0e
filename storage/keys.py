"""Every storage key genq writes, named in this one module.

Keys are built from genq's own ids only (checked here), never from a user's string: a file name, a
custom_id or metadata never reaches a key or a path.

    files/{file_id}                              an uploaded or generated file's bytes
    batches/{batch_id}/shards/{index:05d}.jsonl  a shard's request lines
    batches/{batch_id}/{output|errors}.jsonl     a finished batch's result files
    batches/{batch_id}/images/{file_id}.png      an image line's PNG (a file row names it; retired with the batch)
    fine_tunes/{job_id}/state/step-{N:07d}.pt     a fine-tune's resumable training state (the latest kept)
    fine_tunes/{job_id}/checkpoints/step-{N}/     an epoch checkpoint's adapter (PEFT layout; the last 3 kept)
    fine_tunes/{job_id}/model/                   the final adapter
"""

from __future__ import annotations

import re

_ID = re.compile(r"(file-|batch_|ftjob-)[0-9a-f]{8,64}")


def _own_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a genq file, batch or job id; storage keys are built from those only")
    return value


def file_key(file_id: str) -> str:
    return f"files/{_own_id(file_id)}"


def batch_prefix(batch_id: str) -> str:
    """The prefix of every object of a batch (its shards and result files)."""
    return f"batches/{_own_id(batch_id)}/"


def shard_key(batch_id: str, index: int) -> str:
    return f"{batch_prefix(batch_id)}shards/{int(index):05d}.jsonl"


def batch_result_key(batch_id: str, kind: str) -> str:
    if kind not in ("output", "errors"):
        raise ValueError(f"unknown result file kind {kind!r}")
    return f"{batch_prefix(batch_id)}{kind}.jsonl"


def batch_image_key(batch_id: str, file_id: str) -> str:
    return f"{batch_prefix(batch_id)}images/{_own_id(file_id)}.png"


def fine_tune_prefix(job_id: str) -> str:
    """The prefix of every object of a fine-tune (states, checkpoints, its final adapter)."""
    return f"fine_tunes/{_own_id(job_id)}/"


def training_state_key(job_id: str, step: int) -> str:
    return f"{fine_tune_prefix(job_id)}state/step-{int(step):07d}.pt"


def adapter_prefix(job_id: str, checkpoint_step: int | None = None) -> str:
    """Where an adapter's files go: the final model's, or an epoch checkpoint's."""
    if checkpoint_step is None:
        return f"{fine_tune_prefix(job_id)}model/"
    return f"{fine_tune_prefix(job_id)}checkpoints/step-{int(checkpoint_step)}/"
