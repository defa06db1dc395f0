"""Peer runner: optimum's ONNX Runtime pipeline (optimum-onnx's ORTPipelineForText2Image), fp32.

It reads optimum's ONNX layout, which `sdrt export` writes, so it runs the very graphs sdrt
runs; diffusers' pipeline code (subclassed) drives the loop with torch tensors, and ONNX Runtime's
CPU provider runs the graphs with its default session options. Needs its own venv:
optimum-onnx pins transformers < 4.58 (benchmarks/peers/README.md).
"""

from __future__ import annotations

import _runner


def main() -> None:
    args = _runner.parse_args(__doc__.splitlines()[0], ("fp32",))
    import diffusers
    import onnxruntime
    import torch
    from optimum.onnxruntime import ORTPipelineForText2Image

    def load():
        options = onnxruntime.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        pipe = ORTPipelineForText2Image.from_pretrained(
            args.model, export=False, provider="CPUExecutionProvider",
            session_options=options)
        _runner.set_sampler(pipe, args.sampler, diffusers)
        return pipe, _runner.count_forward(pipe.unet)

    row, _ = _runner.measure(load, _runner.pipeline_call(args, torch), args.runs)
    row["versions"] = _runner.versions("optimum-onnx", "optimum", "onnxruntime", "diffusers",
                                       "transformers", "torch")
    row["notes"] = "ONNX Runtime CPUExecutionProvider, dynamic shapes"
    _runner.report(row)


if __name__ == "__main__":
    main()
