"""LoRA files and textual-inversion embeddings applied to exported graphs at run time."""
