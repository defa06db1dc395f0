"""Evaluation shared by training, quantization gates and benchmarks: the scenes dataset
(`scenes`) and the prompt-adherence evaluator (`adherence`)."""
