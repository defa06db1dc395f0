"""sdrt quantize stage: precision variants of exported graphs, each gated on fidelity vs fp32."""
