"""Fine-tuning's training core: LoRA adapters on the runtime's decoder, SFT and DPO, resumable segments.

data.py (training-file contract) is torch-free and tokenizer-free: the API validates uploads with it.
prepare.py tokenizes validated examples with the model's chat template (pure Python, no torch).
packing.py, train_forward.py, lora.py, base_model.py and trainer.py import torch and workers.runtime;
only worker processes load them.
"""
