"""Bad checkpoints and bad requests get an exception naming the file (or request) and the problem."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_gguf, write_hf_dir
from workers.runtime.errors import ContextLengthError, ModelLoadError
from workers.runtime.gguf_loader import load_gguf
from workers.runtime.loader import load_checkpoint
from workers.runtime.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    config = tiny_hf_config("llama")
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", config, random_hf_state(config))


def assert_names(err: pytest.ExceptionInfo, path, *words: str) -> None:
    message = str(err.value)
    assert isinstance(err.value, ModelLoadError)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(path)
    assert_names(err, path, "not found")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path, "not a GGUF file")


@pytest.mark.parametrize("keep", [6, 100, 3000], ids=["in-magic-and-version", "in-header", "in-metadata"])
def test_truncated_header(good_gguf, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_gguf.read_bytes()[:keep])
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path)
    assert "truncated" in str(err.value) or "not a GGUF" in str(err.value) or "corrupt" in str(err.value)


def test_truncated_tensor_data(good_gguf, tmp_path):
    data = good_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 100_000])
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path, "truncated")


def test_corrupt_header(good_gguf, tmp_path):
    data = bytearray(good_gguf.read_bytes())
    data[8:24] = b"\xff" * 16  # tensor and key/value counts -> absurd
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path)


def test_random_garbage_after_magic(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path)


def test_unsupported_quantization(tmp_path):
    config = tiny_hf_config("llama")
    path = write_gguf(tmp_path / "q5_0.gguf", config, random_hf_state(config), qtype=Q.Q5_0)
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path, "unsupported quantization type Q5_0")


def test_unsupported_architecture(tmp_path):
    config = tiny_hf_config("llama")
    path = write_gguf(tmp_path / "mamba.gguf", config, random_hf_state(config), arch="mamba")
    with pytest.raises(ModelLoadError) as err:
        load_gguf(path)
    assert_names(err, path, "unsupported architecture 'mamba'")


def test_safetensors_dir_problems(tmp_path):
    config = tiny_hf_config("llama")
    state = random_hf_state(config)
    good = write_hf_dir(tmp_path / "good", config, state)
    bad_arch = shutil.copytree(good, tmp_path / "arch")
    (bad_arch / "config.json").write_text((good / "config.json").read_text().replace('"llama"', '"gpt_neox"'))
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(bad_arch)
    assert_names(err, bad_arch / "config.json", "unsupported architecture 'gpt_neox'")

    cut = shutil.copytree(good, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(cut)
    assert_names(err, weights, "truncated or corrupt")

    missing = shutil.copytree(good, tmp_path / "missing")
    (missing / "config.json").unlink()
    (missing / "model.safetensors").rename(missing / "weights.bin")
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(missing)
    assert_names(err, missing / "config.json", "not found")


def test_prompt_longer_than_context(good_gguf):
    lm = load_checkpoint(good_gguf)  # context 64
    too_long = GenerationRequest("long", list(range(60)), SamplingParams(temperature=0, max_tokens=10))
    fine = GenerationRequest("fine", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens"):
        lm.engine.validate(too_long)
    seen = []
    results = lm.generate([too_long, fine], on_result=seen.append)
    assert [r.request_id for r in results] == ["long", "fine"]
    assert isinstance(results[0].error, ContextLengthError) and results[0].token_ids == []
    assert "maximum context length is 64" in str(results[0].error)
    assert results[1].error is None and results[1].completion_tokens == 4
    assert sorted(r.request_id for r in seen) == ["fine", "long"]
