"""Kernel implementations behind the dsv4 op names (Triton everywhere; CuTe-DSL for hot ops later)."""
