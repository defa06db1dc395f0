"""sdrt benchmarks: scripts that measure the runtime and its peers (never timed tests)."""
