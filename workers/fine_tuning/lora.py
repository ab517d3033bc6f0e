"""LoRA adapters for the runtime's fused decoder, saved in PEFT's layout, mergeable into a served copy.

A target's delta is scale * B @ A (A: [r, in], B: [out, r], scale = alpha / r) added to the rows of
its fused linear: q, k, v are row blocks of attention.wqkv ([q_size | kv_size | kv_size] rows), gate
and up of feed_forward.w13 ([hidden | hidden]), o is attention.wo and down feed_forward.w2. One fused
linear runs its targets' A in one matmul (A_q|A_k|A_v stacked: [3r, in]) and their B as one
block-diagonal [out, 3r] matmul, so a LoRA'd wqkv costs two thin matmuls beside the base one.

Init follows PEFT (init_lora_weights=True): A ~ kaiming_uniform(a=sqrt(5)), B = 0, so a fresh
adapter changes nothing. On disk: adapter_model.safetensors with PEFT's names for a Llama model
(base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight ...) and adapter_config.json,
which `peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)` loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from workers.runtime.config import ModelConfig

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# fused linear (its name in a decoder layer) -> the targets whose rows it holds, in row order
FUSED_PARTS: dict[str, tuple[str, ...]] = {"attention.wqkv": ("q", "k", "v"), "attention.wo": ("o",),
                                           "feed_forward.w13": ("gate", "up"), "feed_forward.w2": ("down",)}
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_TARGET_OF_PEFT = {module.rsplit(".", 1)[1]: target for target, module in PEFT_MODULES.items()}


@dataclass(frozen=True)
class LoraConfig:
    """Which linears get an adapter, and its size."""

    rank: int = 8  # r
    alpha: float = 16.0  # the delta is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (PEFT's lora_dropout)
    target_modules: tuple[str, ...] = TARGETS  # subset of TARGETS

    def __post_init__(self) -> None:
        unknown = set(self.target_modules) - set(TARGETS)
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {TARGETS}, got {self.target_modules}")
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("rank must be >= 1 and dropout in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each target's own (unfused) linear."""
    c = config
    return {"q": (c.q_size, c.dim), "k": (c.kv_size, c.dim), "v": (c.kv_size, c.dim), "o": (c.dim, c.q_size),
            "gate": (c.hidden_dim, c.dim), "up": (c.hidden_dim, c.dim), "down": (c.dim, c.hidden_dim)}


class FusedLora(nn.Module):
    """The adapters of one fused linear: lora_A[t] [r, in], lora_B[t] [out_t, r] for each targeted part t."""

    def __init__(self, fused_name: str, targets: tuple[str, ...], shapes: dict[str, tuple[int, int]],
                 rank: int) -> None:
        super().__init__()
        self.fused_name = fused_name  # e.g. "attention.wqkv"
        self.parts = FUSED_PARTS[fused_name]  # every part of the fused output, in row order
        self.targets = targets  # those with an adapter, in row order
        self.rank = rank
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, shapes[t][1])) for t in targets})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(shapes[t][0], rank)) for t in targets})
        self.part_rows = {p: shapes[p][0] for p in self.parts}

    def stacked_a(self) -> torch.Tensor:
        """[n r, in]: the targets' A, stacked."""
        if len(self.targets) == 1:
            return self.lora_A[self.targets[0]]
        return torch.cat([self.lora_A[t] for t in self.targets])

    def block_b(self) -> torch.Tensor:
        """[out, n r]: each target's B in its part's rows and its own r columns; zeros elsewhere."""
        n, r = len(self.targets), self.rank
        if self.targets == self.parts and n == 1:
            return self.lora_B[self.targets[0]]
        blocks = []
        for p in self.parts:
            if p in self.lora_B:
                j = self.targets.index(p)
                blocks.append(F.pad(self.lora_B[p], (j * r, (n - 1 - j) * r)))
            else:
                blocks.append(self.lora_B[self.targets[0]].new_zeros(self.part_rows[p], n * r))
        return torch.cat(blocks)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        """out + scale * (x A^T) B^T for x [T, in], out [T, out]."""
        h = F.linear(x, self.stacked_a())  # [T, n r]
        return torch.addmm(out, h, self.block_b().t(), alpha=scale)

    def delta_weight(self, target: str) -> torch.Tensor:
        """B_t @ A_t [out_t, in] in fp32."""
        return self.lora_B[target].float() @ self.lora_A[target].float()


class LoraAdapters(nn.Module):
    """LoRA adapters for every decoder layer; the base model stays untouched (train_forward adds the deltas)."""

    def __init__(self, model_config: ModelConfig, config: LoraConfig, *, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.model_config = model_config
        self.config = config
        shapes = target_shapes(model_config)
        self.layers = nn.ModuleList()
        for _ in range(model_config.n_layers):
            layer = nn.ModuleDict()
            for fused, parts in FUSED_PARTS.items():
                targets = tuple(p for p in parts if p in config.target_modules)
                if targets:
                    layer[fused.replace(".", "_")] = FusedLora(fused, targets, shapes, config.rank)
            self.layers.append(layer)
        generator = torch.Generator().manual_seed(seed)
        for module in self.fused_loras():
            for t in module.targets:
                nn.init.kaiming_uniform_(module.lora_A[t], a=math.sqrt(5), generator=generator)
        self.to(device)

    def fused_loras(self) -> list[FusedLora]:
        return [m for layer in self.layers for m in layer.values()]

    def get(self, layer: int, fused: str) -> FusedLora | None:
        """The adapters of layer's fused linear (e.g. "attention.wqkv"), or None when it has no target."""
        key = fused.replace(".", "_")
        layer_modules = self.layers[layer]
        return layer_modules[key] if key in layer_modules else None

    # -------------------------------------------------------------- PEFT layout

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names -> fp32 CPU copies (what adapter_model.safetensors holds)."""
        out = {}
        for i, layer in enumerate(self.layers):
            for module in layer.values():
                for t in module.targets:
                    name = f"base_model.model.model.layers.{i}.{PEFT_MODULES[t]}"
                    out[f"{name}.lora_A.weight"] = module.lora_A[t].detach().float().cpu().contiguous().clone()
                    out[f"{name}.lora_B.weight"] = module.lora_B[t].detach().float().cpu().contiguous().clone()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies PEFT-named tensors in; every adapter of this module must be present with its shape."""
        expected = self.adapter_state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"adapter tensors do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                for module in layer.values():
                    for t in module.targets:
                        name = f"base_model.model.model.layers.{i}.{PEFT_MODULES[t]}"
                        for key, param in (("lora_A", module.lora_A[t]), ("lora_B", module.lora_B[t])):
                            value = state[f"{name}.{key}.weight"]
                            if value.shape != param.shape:
                                raise ValueError(f"{name}.{key}.weight has shape {tuple(value.shape)}, "
                                                 f"expected {tuple(param.shape)}")
                            param.copy_(value)

    def peft_config(self, base_model_name_or_path: str) -> dict:
        """adapter_config.json for PEFT's PeftModel.from_pretrained."""
        c = self.config
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
            "target_modules": [PEFT_MODULES[t].rsplit(".", 1)[1] for t in TARGETS if t in c.target_modules],
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }


def lora_config_from_peft(peft: dict) -> LoraConfig:
    """LoraConfig of a PEFT adapter_config.json (plain LoRA on named Llama projections only)."""
    if peft.get("peft_type") != "LORA" or peft.get("use_dora") or peft.get("use_rslora"):
        raise ValueError("only plain LoRA adapters (no DoRA, no rsLoRA) are supported")
    if peft.get("rank_pattern") or peft.get("alpha_pattern") or peft.get("layers_to_transform"):
        raise ValueError("per-layer ranks, alphas or layer subsets are not supported")
    modules = peft.get("target_modules")
    if not isinstance(modules, list) or any(m not in _TARGET_OF_PEFT for m in modules):
        raise ValueError(f"target_modules must list Llama projections {sorted(_TARGET_OF_PEFT)}, got {modules!r}")
    targets = tuple(t for t in TARGETS if PEFT_MODULES[t].rsplit(".", 1)[1] in modules)
    return LoraConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                      dropout=float(peft.get("lora_dropout", 0.0)), target_modules=targets)


def adapter_files(adapters: LoraAdapters, base_model_name_or_path: str) -> dict[str, bytes]:
    """File name -> bytes of a PEFT adapter directory (for object storage)."""
    weights = safetensors_save(adapters.adapter_state_dict(), metadata={"format": "pt"})
    config = json.dumps(adapters.peft_config(base_model_name_or_path), indent=2).encode()
    return {ADAPTER_WEIGHTS_FILE: weights, ADAPTER_CONFIG_FILE: config}


def save_adapter(adapters: LoraAdapters, directory: str | Path, base_model_name_or_path: str) -> Path:
    """Writes adapter_model.safetensors and adapter_config.json into directory; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(adapters, base_model_name_or_path).items():
        (directory / name).write_bytes(data)
    return directory


def load_adapter(source: str | Path | dict[str, bytes], model_config: ModelConfig,
                 device: torch.device | str = "cpu") -> LoraAdapters:
    """Adapters from a PEFT directory or from adapter_files' dict, for a model of model_config."""
    if not isinstance(source, dict):
        directory = Path(source)
        source = {name: (directory / name).read_bytes() for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)}
    config = lora_config_from_peft(json.loads(source[ADAPTER_CONFIG_FILE]))
    adapters = LoraAdapters(model_config, config, device=device)
    adapters.load_adapter_state_dict(safetensors_load(source[ADAPTER_WEIGHTS_FILE]))
    return adapters


def merge_into(fused_state: dict[str, torch.Tensor], adapters: LoraAdapters) -> dict[str, torch.Tensor]:
    """A copy of the decoder's state (weights.py fused names) with W[rows of t] += scale * B_t @ A_t.

    Computed in fp32, stored back in each weight's dtype; tensors without an adapter are shared, not copied.
    """
    out = dict(fused_state)
    scale = adapters.config.scale
    for i, layer in enumerate(adapters.layers):
        for module in layer.values():
            name = f"layers.{i}.{module.fused_name}.weight"
            weight = fused_state[name].float().clone()
            row = 0
            for part in module.parts:
                rows = module.part_rows[part]
                if part in module.targets:
                    weight[row:row + rows] += scale * module.delta_weight(part).to(weight.device)
                row += rows
            out[name] = weight.to(fused_state[name].dtype)
    return out
