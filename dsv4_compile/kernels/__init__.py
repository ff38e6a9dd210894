"""Kernel implementations behind the dsv4 op names: Triton for every op (``triton/``), CuTe DSL for the
hot ones on sm_90a / sm_100a (``cute/``: indexer-q, KV insert; ``cute.backend`` picks, ``DSV4_BACKEND``
forces)."""
