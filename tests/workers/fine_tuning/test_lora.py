"""LoRA on the fused decoder: identity at init, merge == unmerged, PEFT's layout, PEFT's own forward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workers.fine_tuning.lora import (
    ADAPTER_CONFIG_FILE,
    LoraAdapters,
    LoraConfig,
    adapter_files,
    load_adapter,
    lora_config_from_peft,
    merge_into,
    save_adapter,
)
from workers.fine_tuning.packing import pack_row
from workers.fine_tuning.train_forward import all_logits, hidden_states
from workers.runtime.model import build_model

SEQUENCES = [[5, 70, 71, 80, 90, 3, 4, 9, 10, 11, 200, 201], [100, 12, 99, 4, 5, 6]]


def random_adapters(config, lora: LoraConfig, seed: int = 0) -> LoraAdapters:
    """Adapters with B drawn too (a fresh adapter's B is 0), so every delta is visible."""
    adapters = LoraAdapters(config, lora, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in adapters.fused_loras():
            for t in module.targets:
                module.lora_B[t].copy_(torch.randn(module.lora_B[t].shape, generator=g) * 0.05)
    return adapters


def logits(model, adapters=None) -> torch.Tensor:
    batch = pack_row([(tuple(s), (1,) * len(s)) for s in SEQUENCES])
    with torch.no_grad():
        return all_logits(model, hidden_states(model, batch, adapters))


def test_fresh_adapters_change_nothing_and_follow_peft_init(tiny_lm):
    adapters = LoraAdapters(tiny_lm.config, LoraConfig())
    assert torch.equal(logits(tiny_lm.model, adapters), logits(tiny_lm.model))
    for module in adapters.fused_loras():
        for t in module.targets:
            a = module.lora_A[t]
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert a.abs().max() <= bound and a.std() > bound / 3 and not module.lora_B[t].any()
    same = LoraAdapters(tiny_lm.config, LoraConfig(), seed=0).adapter_state_dict()
    assert all(torch.equal(v, same[k]) for k, v in adapters.adapter_state_dict().items())


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("k",), ("q", "v"), ("up", "down")])
def test_merged_weights_equal_the_unmerged_forward(tiny_lm, targets):
    adapters = random_adapters(tiny_lm.config, LoraConfig(rank=4, alpha=8, target_modules=targets))
    unmerged = logits(tiny_lm.model, adapters)
    assert (unmerged - logits(tiny_lm.model)).abs().max() > 1e-3  # the adapters do something
    state = tiny_lm.model.state_dict()
    merged_state = merge_into(state, adapters)
    merged = build_model(tiny_lm.config, merged_state, torch.device("cpu"), torch.float32)
    diff = (logits(merged) - unmerged).abs()
    assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    # Only the targets' rows moved; q_size rows of q, then k, then v in wqkv.
    c = tiny_lm.config
    rows = {"q": (0, c.q_size), "k": (c.q_size, c.q_size + c.kv_size), "v": (c.q_size + c.kv_size, None)}
    wqkv, new = state["layers.0.attention.wqkv.weight"], merged_state["layers.0.attention.wqkv.weight"]
    for part, (a, b) in rows.items():
        assert torch.equal(wqkv[a:b], new[a:b]) is (part not in targets)
    if "o" not in targets:
        assert merged_state["layers.0.attention.wo.weight"] is state["layers.0.attention.wo.weight"]


def test_adapter_files_use_peft_names_and_round_trip(tiny_lm, tmp_path):
    adapters = random_adapters(tiny_lm.config, LoraConfig(rank=4, alpha=8, dropout=0.05))
    state = adapters.adapter_state_dict()
    c = tiny_lm.config
    assert state["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (4, c.dim)
    assert state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (c.kv_size, 4)
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, c.hidden_dim)
    assert len(state) == 2 * 7 * c.n_layers
    files = adapter_files(adapters, "tiny-llama")
    config = json.loads(files[ADAPTER_CONFIG_FILE])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_config_from_peft(config) == adapters.config
    for source in (files, save_adapter(adapters, tmp_path / "adapter", "tiny-llama")):
        loaded = load_adapter(source, tiny_lm.config).adapter_state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        LoraAdapters(tiny_lm.config, LoraConfig(rank=8)).load_adapter_state_dict(state)


def test_peft_loads_the_adapter_into_transformers_with_the_same_logits(tiny_lm, tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapters = random_adapters(tiny_lm.config, LoraConfig(rank=4, alpha=16))
    directory = save_adapter(adapters, tmp_path / "adapter", str(tiny_dir))
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, directory).eval()
    merged = build_model(tiny_lm.config, merge_into(tiny_lm.model.state_dict(), adapters), torch.device("cpu"),
                         torch.float32)
    ours = logits(merged)
    offset = 0
    for sequence in SEQUENCES:
        with torch.no_grad():
            theirs = model(torch.tensor([sequence])).logits[0]  # PEFT's unmerged forward
        mine = ours[offset:offset + len(sequence)]
        offset += len(sequence)
        diff = (mine - theirs).abs()
        assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
    # PEFT's own merge puts the same numbers in q_proj as merge_into puts in wqkv's q rows.
    q_peft = model.merge_and_unload().model.layers[1].self_attn.q_proj.weight
    q_ours = merged.layers[1].attention.wqkv.weight[: tiny_lm.config.q_size]
    assert (q_peft - q_ours).abs().max() < 1e-6
