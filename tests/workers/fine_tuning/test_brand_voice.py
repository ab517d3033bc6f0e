"""Acceptance: LoRA SFT of the bundled SmolLM2-135M on examples/finetune_brand_voice.jsonl learns the house voice.

80 of the 216 training examples (the other 24 of the file are the seeded validation split), one epoch
of 20 steps of 4, rank 8 on every projection, fp32 on the CPU. Then the merged model, served by the
runtime's engine, writes greedy copy for 12 products whose brands and titles the file never names.
Measured on 2 shared CPU cores: 89 s for the test (52 s of it training), 270 s while another process
competed for the cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.fine_tuning.data import Method, read_training_file
from workers.fine_tuning.hyperparameters import Hyperparameters, resolve_hyperparameters
from workers.fine_tuning.lora import LoraConfig, merge_into
from workers.fine_tuning.prepare import prepare
from workers.fine_tuning.trainer import Trainer, TrainerConfig
from workers.registry import bundled_gguf_path
from workers.runtime.chat_template import render_chat_template
from workers.runtime.engine import Engine, EngineConfig
from workers.runtime.loader import read_checkpoint
from workers.runtime.model import build_model
from workers.runtime.types import GenerationRequest, SamplingParams
from workers.runtime.weights import fuse_projections

pytestmark = pytest.mark.slow

TRAINING_FILE = Path(__file__).parents[3] / "examples" / "finetune_brand_voice.jsonl"
SYSTEM = "You write product copy in the house voice."
# (brand, product, category, material, variant, color, features): no brand or title of the training file
HELD_OUT = [
    ("Pinecrest", "Travel Mug", "Kitchen", "stainless steel", "350 ml", "olive", "leak-proof; lifetime warranty"),
    ("Silverline", "Yoga Mat", "Outdoor", "natural rubber", "6 mm", "teal", "non-slip; lightweight"),
    ("Redwood Bay", "Bluetooth Speaker", "Electronics", "aluminium", "10 W", "black", "water resistant"),
    ("Orchid", "Lip Balm", "Beauty", "beeswax", "4 g", "rose", "vegan; made in France"),
    ("Granite", "Cast Iron Skillet", "Kitchen", "cast iron", "26 cm", "charcoal", "pre-seasoned; lifetime warranty"),
    ("Willowmere", "Linen Shirt", "Apparel", "washed linen", "S-XXL", "sand", "breathable; made in Portugal"),
    ("Stonebrook", "Camping Stove", "Outdoor", "titanium", "1 burner", "silver", "lightweight; wind resistant"),
    ("Aurora", "Night Light", "Home", "frosted glass", "E14", "white", "dimmable; energy saving"),
    ("Marigold", "Hand Cream", "Beauty", "shea butter", "75 ml", "yellow", "fragrance-free"),
    ("Tundra", "Down Vest", "Apparel", "recycled nylon", "XS-XL", "navy", "packable; water resistant"),
    ("Blue Heron", "Laptop Stand", "Electronics", "anodized aluminium", "10-16 in", "grey", "foldable"),
    ("Cedarpoint", "Picnic Blanket", "Home", "recycled wool", "150 x 200 cm", "green", "machine washable"),
]


def product_chat(brand: str, product: str, category: str, material: str, variant: str, color: str,
                 features: str) -> list[dict[str, str]]:
    """The training file's user-message format for a product."""
    data = (f"Product data:\nTitle: {brand} {product}\nBrand: {brand}\nCategory: {category}\nMaterial: {material}\n"
            f"Variant: {variant}\nColor: {color}\nPrice: $42.00\nFeatures: {features}\n\nWrite the description.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": data}]


def signed_copies(model, checkpoint) -> tuple[int, list[str]]:
    """How many greedy completions end with "Made to last, by BRAND." for the held-out products, and the texts."""
    tokenizer = checkpoint.tokenizer
    engine = Engine(model, tokenizer, context_length=2048, cache_key="brand-voice",
                    config=EngineConfig(kv_cache_bytes=64 << 20))
    requests = []
    for product in HELD_OUT:
        text = render_chat_template(checkpoint.chat_template, product_chat(*product), add_generation_prompt=True,
                                    bos_token=tokenizer.special.bos_token, eos_token=tokenizer.special.eos_token)
        requests.append(GenerationRequest(product[0], tokenizer.encode(text, add_bos=False),
                                          SamplingParams(temperature=0, max_tokens=80)))
    results = engine.generate(requests)
    texts = [r.text.strip() for r in results]
    return sum(t.endswith(f"Made to last, by {p[0]}.") for t, p in zip(texts, HELD_OUT, strict=True)), texts


def test_sft_learns_the_brand_voice_on_held_out_products():
    checkpoint = read_checkpoint(bundled_gguf_path())
    base_state = fuse_projections(checkpoint.tensors, checkpoint.config)
    base = build_model(checkpoint.config, base_state, torch.device("cpu"), torch.float32)

    with TRAINING_FILE.open("rb") as f:
        training = read_training_file(f, Method.SUPERVISED)
    data = prepare(training, checkpoint.tokenizer, checkpoint.chat_template, max_length=256, seed=0)
    assert (data.stats["train_examples"], data.stats["validation_examples"]) == (216, 24)
    for product in HELD_OUT:  # really held out: neither the brand nor the title is in the file
        assert all(f"Brand: {product[0]}\n" not in m.content and product[1] not in m.content
                   for e in training.examples for m in e.messages)
    data.train = data.train[:80]
    hyper = resolve_hyperparameters(Hyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=1.0), 80,
                                    Method.SUPERVISED)
    trainer = Trainer(base, data, TrainerConfig(Method.SUPERVISED, hyper, LoraConfig(rank=8, alpha=16), seed=0,
                                                warmup_fraction=0.1, log_every=5))
    before = trainer.evaluate()["valid_loss"]
    result = trainer.run_segment()
    assert result.finished and result.step == 20
    after = result.metrics[-1]["full_valid_loss"]
    assert after <= 0.7 * before, (before, after)

    merged = build_model(checkpoint.config, merge_into(base_state, trainer.adapters), torch.device("cpu"),
                         torch.float32)
    tuned_signed, tuned_texts = signed_copies(merged, checkpoint)
    base_signed, base_texts = signed_copies(base, checkpoint)
    assert tuned_signed >= 0.9 * len(HELD_OUT), tuned_texts
    assert base_signed <= 1, base_texts
