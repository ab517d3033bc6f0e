"""The model runtime: a Llama-family decoder in PyTorch, its loaders, tokenizer and generator."""
