"""The registry path: model id -> local directory, GGUF file or s3:// prefix -> a LoadedModel."""

from __future__ import annotations

import json

import pytest
import torch

from genq.settings import Settings
from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_gguf, write_hf_dir
from workers.registry import UnknownModelError
from workers.runtime.errors import ModelLoadError
from workers.runtime.loader import download_s3_prefix, load_registered_model
from workers.runtime.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    config = tiny_hf_config("llama", context=128)
    state = random_hf_state(config, seed=5)
    root = tmp_path_factory.mktemp("registry")
    write_gguf(root / "tiny.gguf", config, state)
    return write_hf_dir(root / "hf", config, state)


def settings_with(tmp_path, models: dict, **extra) -> Settings:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps(models))
    return Settings(home=tmp_path / "home", models_file=models_file, device="cpu", **extra)


def greedy(lm, n=3):
    [r] = lm.generate([GenerationRequest("x", lm.encode("hi"), SamplingParams(temperature=0, max_tokens=n))])
    return r


def test_local_directory_and_gguf(tiny_dir, tmp_path):
    settings = settings_with(tmp_path, {
        "tiny-dir": {"source": str(tiny_dir), "context_length": 32},
        "tiny-gguf": {"source": str(tiny_dir.parent / "tiny.gguf"), "context_length": 100},
    })
    a, b = load_registered_model("tiny-dir", settings), load_registered_model("tiny-gguf", settings)
    assert (a.model_id, a.context_length, b.context_length) == ("tiny-dir", 32, 100)
    assert greedy(a).token_ids == greedy(b).token_ids
    with pytest.raises(UnknownModelError):
        load_registered_model("nope", settings)


def test_dtype_setting(tiny_dir, tmp_path):
    settings = settings_with(tmp_path, {"tiny": {"source": str(tiny_dir)}}, dtype="bfloat16")
    lm = load_registered_model("tiny", settings)
    assert lm.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert greedy(lm, 4).completion_tokens <= 4


def test_missing_local_source(tmp_path):
    settings = settings_with(tmp_path, {"gone": {"source": str(tmp_path / "gone.gguf")}})
    with pytest.raises(ModelLoadError, match="gone.gguf: file not found"):
        load_registered_model("gone", settings)


@pytest.mark.slow
def test_s3_prefix_is_downloaded_once(tiny_dir, tmp_path, s3_server, monkeypatch):
    client = s3_server.client()
    for f in tiny_dir.iterdir():
        client.upload_file(str(f), s3_server.bucket, f"models/tiny/{f.name}")
    client.put_object(Bucket=s3_server.bucket, Key="models/tiny2/decoy.txt", Body=b"not mine")
    client.upload_file(str(tiny_dir.parent / "tiny.gguf"), s3_server.bucket, "gguf/tiny.gguf")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings = settings_with(tmp_path, {
        "tiny-s3": {"source": f"s3://{s3_server.bucket}/models/tiny"},
        "tiny-s3-gguf": {"source": f"s3://{s3_server.bucket}/gguf/tiny.gguf"},
    }, s3_endpoint_url=s3_server.endpoint_url)
    lm = load_registered_model("tiny-s3", settings)
    local = tmp_path / "home" / "models" / s3_server.bucket / "models" / "tiny"
    assert lm.path == local and (local / "model.safetensors").is_file()
    assert not (local.parent / "tiny2").exists()
    assert load_registered_model("tiny-s3-gguf", settings).path.name == "tiny.gguf"
    # A second resolution finds the files in place and downloads nothing.
    before = {p: p.stat().st_mtime_ns for p in local.iterdir()}
    download_s3_prefix(f"s3://{s3_server.bucket}/models/tiny", tmp_path / "home" / "models", None, client=client)
    assert {p: p.stat().st_mtime_ns for p in local.iterdir()} == before
    with pytest.raises(ModelLoadError, match="no objects"):
        download_s3_prefix(f"s3://{s3_server.bucket}/models/nothing", tmp_path / "x", None, client=client)
