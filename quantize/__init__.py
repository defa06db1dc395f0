"""sdrt quantize stage: precision variants of exported graphs, each gated on fidelity vs fp32.

stage.py runs `sdrt quantize` (make, gate, list); ort.py and openvino.py make one graph each with
onnxruntime's tools or NNCF; calibration.py records graph inputs from fp32 pipeline runs;
gates.py compares a variant with fp32; prompts.py holds the prompts both use; control.py does the
same for a ControlNet folder, gated with the control applied on a base model. The runtime never
imports this package: it reads the variants manifest.json lists (sdrt.runtime.model.variants).
"""
