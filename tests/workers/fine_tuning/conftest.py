"""Fixtures of the training-core tests: a tiny random Llama (byte tokenizer, ChatML) and chats for it."""

from __future__ import annotations

import json

import pytest

from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_hf_dir
from workers.fine_tuning.data import Method, read_training_file
from workers.fine_tuning.prepare import prepare
from workers.runtime.loader import load_checkpoint

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Ned", "Oz", "Pia"]


def chat_lines(n: int = 16) -> list[str]:
    """n supervised lines: a system turn, "name: X", and the reply "hi X!"."""
    return [json.dumps({"messages": [{"role": "system", "content": "greet"},
                                     {"role": "user", "content": f"name: {NAMES[i % len(NAMES)]}{i}"},
                                     {"role": "assistant", "content": f"hi {NAMES[i % len(NAMES)]}{i}!"}]})
            for i in range(n)]


def pair_lines(n: int = 12) -> list[str]:
    """n DPO lines preferring "yes X" over "no X"."""
    return [json.dumps({"input": {"messages": [{"role": "user", "content": f"ok {NAMES[i % len(NAMES)]}?"}]},
                        "preferred_output": [{"role": "assistant", "content": f"yes {i}"}],
                        "non_preferred_output": [{"role": "assistant", "content": f"no {i}"}]})
            for i in range(n)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (2 layers, dim 256, GQA 4/2 heads, untied head) as a transformers directory."""
    config = tiny_hf_config("llama", context=256)
    return write_hf_dir(tmp_path_factory.mktemp("tiny-llama") / "hf", config, random_hf_state(config, seed=3))


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    """The tiny model loaded by the runtime (fp32, CPU)."""
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_chats(tiny_lm):
    """PreparedData of 16 chats (2 held out for validation)."""
    training = read_training_file(chat_lines(16), Method.SUPERVISED)
    return prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=64, seed=0)


@pytest.fixture(scope="session")
def tiny_pairs(tiny_lm):
    """PreparedData of 12 DPO pairs."""
    training = read_training_file(pair_lines(12), Method.DPO)
    return prepare(training, tiny_lm.tokenizer, tiny_lm.chat_template, max_length=64, seed=0)
