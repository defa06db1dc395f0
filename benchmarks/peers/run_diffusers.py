"""Peer runner: diffusers on PyTorch (CPU), fp32 or bf16 through torch.autocast.

bf16 is diffusers' documented CPU recipe (the fp32 weights, `torch.autocast("cpu",
dtype=torch.bfloat16)` around the call), so every component, the VAE included, computes in bf16
where autocast allows. Runs in any venv with torch and diffusers (the main .venv has both).
"""

from __future__ import annotations

import _runner


def main() -> None:
    args = _runner.parse_args(__doc__.splitlines()[0], ("fp32", "bf16"))
    import diffusers
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def load():
        # No safety checker: sdrt has none, and it would add a CLIP vision model to the time.
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            args.model, torch_dtype=torch.float32, safety_checker=None,
            requires_safety_checker=False)
        _runner.set_sampler(pipe, args.sampler, diffusers)
        return pipe, _runner.count_forward(pipe.unet)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    row, _ = _runner.measure(load, _runner.pipeline_call(args, torch, autocast), args.runs)
    row["versions"] = _runner.versions("diffusers", "torch", "transformers", "numpy")
    row["notes"] = (f"torch threads {torch.get_num_threads()}; "
                    + ("bf16 autocast" if args.precision == "bf16" else "fp32"))
    _runner.report(row)


if __name__ == "__main__":
    main()
