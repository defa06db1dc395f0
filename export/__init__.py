"""sdrt export stage: diffusers models → ONNX folders in optimum's layout, with a manifest.

Needs torch, diffusers and transformers (the `export` extra); the runtime never imports this.
"""
