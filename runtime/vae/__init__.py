"""VAE decoding beyond one whole-image call: overlapping tiles (`tiled`), tiles sharing GroupNorm
statistics from a pooled pass (`pooled_norm`), the exact stage-by-stage tiled decode
(`exact_tiled`), and a tiny TAESD-style VAE in place of the model's (`tiny`)."""
