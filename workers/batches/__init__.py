"""The chat/completions batch job kind: request contract, shard runner, finalizer. Torch-free on import."""
