"""Perplexity: equal to exp(mean NLL) computed from packed_logits, and lower on text the model predicts."""

from __future__ import annotations

import math

import torch

from tests.workers.runtime.forward import packed_logits
from workers.runtime.evaluate import perplexity


def test_perplexity_is_exp_mean_nll(bundled_lm):
    seqs = [bundled_lm.encode("The quick brown fox jumps over the lazy dog."), bundled_lm.encode("Hello there!")]
    nll, count = 0.0, 0
    for seq, logits in zip(seqs, packed_logits(bundled_lm, seqs), strict=True):
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="sum").item()
        count += len(seq) - 1
    assert math.isclose(perplexity(bundled_lm.model, seqs), math.exp(nll / count), rel_tol=1e-4)
    english = bundled_lm.encode("Water bottles keep drinks cold for hours and are easy to carry.")
    shuffled = english[::-1]
    assert perplexity(bundled_lm.model, [english]) < perplexity(bundled_lm.model, [shuffled])
