"""The model runtime: a Llama-family decoder in PyTorch, its loaders, tokenizer and generator.

Path of a request: loader.load_model(id) -> LoadedModel.render_chat / encode -> LoadedModel.generate
(generator.py: paged KV cache, packed prefill, decode, stop rules) -> model.py forward, which calls
attention and sampling only through kernels/. gguf_loader.py and safetensors_loader.py turn a
checkpoint into weights.py's names once. Imports torch, kernels, genq.settings and workers.registry.
"""
