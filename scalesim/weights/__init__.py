"""Per-agent weights: LoRA adapters and private models, each one movable object."""
