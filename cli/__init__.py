"""The `sdrt` command line: one app above every stage (export, quantize, runtime, benchmarks)."""
