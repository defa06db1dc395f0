"""Peer runner: optimum-intel's OpenVINO pipeline (OVPipelineForText2Image), fp32 or bf16.

It reads optimum-intel's IR folder (`optimum-cli export openvino --weight-format fp32`).
Precision is OpenVINO's INFERENCE_PRECISION_HINT in `ov_config` for every component, the VAE
included ("f32" explicitly: OpenVINO picks bf16 by itself on AMX CPUs). Shapes are made static,
as optimum-intel's documentation recommends for speed: `reshape(batch_size=1, height, width,
num_images_per_prompt=1)` (the UNet at batch 2 for classifier-free guidance), then `compile()`;
both count as load time. Runs in the optimum-intel venv (benchmarks/peers/README.md).
"""

from __future__ import annotations

import _runner

HINTS = {"fp32": "f32", "bf16": "bf16"}


def main() -> None:
    args = _runner.parse_args(__doc__.splitlines()[0], tuple(HINTS))
    import diffusers
    import openvino
    import torch
    from optimum.intel import OVPipelineForText2Image

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if args.precision == "bf16" and "BF16" not in capabilities:
        _runner.skip(f"OpenVINO reports no BF16 on this CPU ({', '.join(capabilities)})")
    ov_config = {"INFERENCE_PRECISION_HINT": HINTS[args.precision]}
    if args.threads:
        ov_config["INFERENCE_NUM_THREADS"] = str(args.threads)
    static = args.guidance > 1  # the static UNet batch assumes guidance (cond + uncond)

    def load():
        pipe = OVPipelineForText2Image.from_pretrained(
            args.model, export=False, device="CPU", ov_config=ov_config, compile=False)
        _runner.set_sampler(pipe, args.sampler, diffusers)
        if static:
            pipe.reshape(batch_size=1, height=args.height, width=args.width,
                         num_images_per_prompt=1)
        pipe.compile()
        return pipe, _runner.count_forward(pipe.unet)

    row, (pipe, _) = _runner.measure(load, _runner.pipeline_call(args, torch), args.runs)
    compiled = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string()
    row["versions"] = _runner.versions("optimum-intel", "optimum", "openvino", "diffusers",
                                       "transformers", "torch")
    shapes = f"static {args.width}x{args.height} batch 1" if static else "dynamic shapes"
    row["notes"] = (f"INFERENCE_PRECISION_HINT {HINTS[args.precision]} (UNet compiled as "
                    f"{compiled}); {shapes}; PERFORMANCE_HINT LATENCY (optimum-intel's default)")
    _runner.report(row)


if __name__ == "__main__":
    main()
