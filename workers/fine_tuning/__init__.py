"""Fine-tuning: LoRA adapters on the runtime's decoder, SFT and DPO trained in resumable segments.

Torch-free (the API imports them): data.py, the training-file contract, and hyperparameters.py, the
"auto" rules. prepare.py tokenizes validated examples with the model's chat template (pure Python).
The training core imports torch and workers.runtime, and only worker processes load it: packing.py,
train_forward.py (the dense forward with LoRA), lora.py (adapters, PEFT layout, merging),
objectives.py (SFT and DPO losses), trainer.py (segments, state). The job kind around it lives beside
them (job_runner.py, serving.py, reap.py).
"""
