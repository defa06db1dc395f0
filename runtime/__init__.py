"""sdrt runtime: Stable Diffusion from exported graphs with NumPy and ONNX Runtime or OpenVINO.

Imports nothing heavier than numpy here; torch, diffusers and transformers are never imported
by this package (the layer rule: pyproject.toml's [tool.sdrt.layers], tests/test_layering.py).
"""

from sdrt.runtime.errors import InputError, ModelError, SdrtError

__all__ = ["InputError", "ModelError", "SdrtError", "Pipeline"]


def __getattr__(name: str):
    # Lazy so that `import sdrt.runtime` stays cheap for the CLI's --help.
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
