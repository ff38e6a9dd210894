"""Triton kernels for every dsv4 op (the CUDA implementation; CuTe DSL overrides the hottest on sm_90a / sm_100a)."""
