"""The model runtime: a Llama-family decoder in PyTorch, its loaders, tokenizer and generation engine.

Path of a request: loader.load_model(id) -> LoadedModel.render_chat / encode -> LoadedModel.submit ->
engine_loop.py (one thread per model and process) -> engine.py step: scheduler.py (queues, chunked
prefill, preemption) with kv_cache_manager.py (blocks, prefix cache) -> model.py forward, which calls
attention and sampling only through kernels/ -> output_processor.py (text, stop strings).
gguf_loader.py and safetensors_loader.py turn a checkpoint into weights.py's names once.
types.py and errors.py are the torch-free seam the job layer sees. Imports torch, kernels,
genq.settings and workers.registry.
"""
