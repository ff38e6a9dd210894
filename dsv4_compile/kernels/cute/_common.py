"""Import guard and backend selection for the CuTe-DSL kernels (no ``cutlass`` import here).

``backend(device)`` picks ``"cute"`` when CuTe DSL and tvm-ffi are importable and the GPU is
sm_90 / sm_100 class (compute capability major 9 or 10), else ``"triton"``. The environment variable
``DSV4_BACKEND=triton|cute`` (read on every call) forces either; forcing ``cute`` without the
packages is an error rather than a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import _device
from .._device import E2M1_ENV  # noqa: F401  (re-exported: the E2M1 override of both backends)

BACKEND_ENV = "DSV4_BACKEND"

# The kernels are written for these compute-capability majors: Hopper (9) and Blackwell (10).
CUTE_ARCH_MAJORS = (9, 10)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Whether ``cutlass`` (nvidia-cutlass-dsl) and ``tvm_ffi`` (apache-tvm-ffi, behind
# ``--enable-tvm-ffi``) can be imported; found without importing either.
HAVE_CUTE = _importable("cutlass") and _importable("tvm_ffi")


device_capability = _device.capability  # a module attribute, so tests can stand in a fake GPU


def _capability(device: torch.device) -> tuple[int, int]:
    return device_capability(_device.index(device))


def backend(device: torch.device) -> str:
    """``"cute"`` or ``"triton"`` for kernels running on ``device`` (see the module docstring)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced == "triton":
        return "triton"
    if forced == "cute":
        if not HAVE_CUTE:
            raise RuntimeError(
                f"{BACKEND_ENV}=cute, but nvidia-cutlass-dsl and apache-tvm-ffi are not both importable; "
                "install them with `pip install 'dsv4-compile[cute]'` or unset the variable"
            )
        return "cute"
    if forced not in ("", "auto"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton', 'cute' or unset, got {forced!r}")
    if not HAVE_CUTE or device.type != "cuda":
        return "triton"
    return "cute" if _capability(device)[0] in CUTE_ARCH_MAJORS else "triton"


def aligned(t: torch.Tensor, div: int, dims) -> bool:
    """Whether ``t`` starts on a multiple of ``div`` elements and its strides along ``dims`` are
    multiples of ``div`` (what the kernels' vector and bulk accesses need)."""
    return t.data_ptr() % (div * t.element_size()) == 0 and all(t.stride(d) % div == 0 for d in dims)


def fresh_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in a new allocation (``contiguous()`` would keep a contiguous view whose
    start is not 16-byte aligned)."""
    return t.clone(memory_format=torch.contiguous_format)


def arch_name(device: torch.device) -> str:
    """The CuTe DSL target of ``device``: ``"sm_90a"``, ``"sm_100a"``, ... (arch-specific features on
    from Hopper on, where the ``a`` targets exist)."""
    major, minor = _capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def use_hw_e2m1(arch: str) -> bool:
    """The hardware ``cvt.rn.satfinite.e2m1x2.f32`` exists from sm_100 on (not on sm_90a);
    ``DSV4_E2M1=software`` forces the software conversion everywhere."""
    if _device.software_e2m1_forced():
        return False
    return int(arch[3:].rstrip("af")) >= 100
