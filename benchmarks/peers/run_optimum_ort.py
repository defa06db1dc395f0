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
        scheduler = getattr(diffusers, _runner.SCHEDULERS[args.sampler])
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe, _runner.count_forward(pipe.unet)

    def generate(loaded) -> int:
        pipe, calls = loaded
        before = len(calls)
        pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
             width=args.width, height=args.height,
             generator=torch.Generator().manual_seed(args.seed))
        return len(calls) - before

    row, _ = _runner.measure(load, generate, args.runs)
    row["versions"] = _runner.versions("optimum-onnx", "optimum", "onnxruntime", "diffusers",
                                       "transformers", "torch")
    row["notes"] = "ONNX Runtime CPUExecutionProvider, dynamic shapes"
    _runner.report(row)


if __name__ == "__main__":
    main()
