"""The engine: runs the model over a paged KV cache with continuous batching."""
