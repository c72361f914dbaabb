"""Llama-family decoders in plain PyTorch, and the loaders that find and read their weights."""
