"""CuTe-DSL kernels (Hopper sm_90a, Blackwell sm_100a) for the hottest dsv4 ops; Triton stays the fallback.

Importing this package never imports ``cutlass``: ``HAVE_CUTE`` only asks whether it could, and the
kernel modules (which do import it) are loaded by the ops once ``backend(device)`` says ``"cute"``.
"""

from ._common import BACKEND_ENV, HAVE_CUTE, arch_name, backend  # noqa: F401
