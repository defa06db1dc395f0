"""Evaluation shared by training, quantization gates and benchmarks: the scenes dataset
(`scenes`), reading a scene from pixels (`pixels`, `detect`), soft generated-looking copies of
true renderings (`degrade`) and the prompt-adherence evaluator (`adherence`)."""
