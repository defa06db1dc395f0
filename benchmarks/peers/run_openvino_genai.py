"""Peer runner: OpenVINO GenAI's Text2ImagePipeline (C++ loop, Python binding), fp32 or bf16.

It reads the same optimum-intel IR folder (with the OpenVINO tokenizer IR that optimum-cli writes
when openvino-tokenizers is installed). The scheduler is GenAI's own C++ DDIM or Euler built from
the folder's scheduler_config.json; shapes are static (`reshape(1, height, width, guidance)`,
which folds the guidance batch into the UNet), then `compile("CPU", INFERENCE_PRECISION_HINT=…)`
for every component; both count as load time. Starting noise comes from GenAI's TorchGenerator.
UNet calls are read from its performance metrics. Runs in the optimum-intel venv.
"""

from __future__ import annotations

from pathlib import Path

import _runner

HINTS = {"fp32": "f32", "bf16": "bf16"}
SCHEDULER_TYPES = {"ddim": "DDIM", "euler": "EULER_DISCRETE"}


def main() -> None:
    args = _runner.parse_args(__doc__.splitlines()[0], tuple(HINTS))
    import openvino
    import openvino_genai

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if args.precision == "bf16" and "BF16" not in capabilities:
        _runner.skip(f"OpenVINO reports no BF16 on this CPU ({', '.join(capabilities)})")
    properties = {"INFERENCE_PRECISION_HINT": HINTS[args.precision]}
    if args.threads:
        properties["INFERENCE_NUM_THREADS"] = args.threads

    def load():
        pipe = openvino_genai.Text2ImagePipeline(args.model)
        kind = getattr(openvino_genai.Scheduler.Type, SCHEDULER_TYPES[args.sampler])
        config = Path(args.model) / "scheduler" / "scheduler_config.json"
        pipe.set_scheduler(openvino_genai.Scheduler.from_config(str(config), kind))
        pipe.reshape(1, args.height, args.width, args.guidance)
        pipe.compile("CPU", **properties)
        return pipe

    def generate(pipe) -> int:
        pipe.generate(args.prompt, width=args.width, height=args.height,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=openvino_genai.TorchGenerator(args.seed))
        return len(pipe.get_performance_metrics().raw_metrics.unet_inference_durations)

    row, _ = _runner.measure(load, generate, args.runs)
    row["versions"] = _runner.versions("openvino-genai", "openvino", "openvino-tokenizers")
    row["notes"] = (f"INFERENCE_PRECISION_HINT {HINTS[args.precision]}; static "
                    f"{args.width}x{args.height} batch 1; GenAI {SCHEDULER_TYPES[args.sampler]}")
    _runner.report(row)


if __name__ == "__main__":
    main()
