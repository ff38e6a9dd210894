"""Test setup: Triton interpreter without a GPU (set before any kernel module is imported), the
interpreter cast fix, the ``cuda`` marker, and compile caches off for tests that inspect passes."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _patch_interpreter_casts():
    """Test-only fix: the Triton interpreter truncates fp32→bf16 and mis-rounds (and does not
    saturate) fp32→fp8e4nv. Route exactly those two conversions through torch, which rounds to
    nearest even like the GPU. ``_convert_float`` is private; its signature is unchanged in 3.6-3.9."""
    import numpy as np
    import triton
    import triton.language as tl

    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    if not ((3, 6) <= (major, minor) <= (3, 9)) or not hasattr(interp, "_convert_float"):
        return
    original = interp._convert_float
    if getattr(original, "_dsv4_patched", False):
        return
    targets = {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16), tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8)}

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in targets:
            tdt, view_dt, np_dt = targets[output_dtype]
            src = torch.from_numpy(np.ascontiguousarray(input).view(np.float32).copy())
            return src.to(tdt).view(view_dt).numpy().view(np_dt).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert._dsv4_patched = True
    interp._convert_float = convert

    # tl.dot on bf16 operands: the interpreter keeps bf16 as raw uint16 and hands those integers to
    # np.matmul. Widen bf16 operands to fp32 first (exact), as the GPU's bf16 MMA does.
    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        return
    original_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(h.data).view(np.uint16).astype(np.uint32) << 16
            return interp.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


if not HAS_CUDA:
    _patch_interpreter_casts()

import dsv4_compile  # noqa: E402,F401  (registers the ops after TRITON_INTERPRET is set)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # a test on ``kernel_device`` runs its kernels on the GPU here: ``-m cuda`` (the GPU suite) selects it
        for item in items:
            if "kernel_device" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.cuda)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    """Where Triton kernels run: the GPU if there is one, else the CPU under TRITON_INTERPRET=1."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def no_compile_cache():
    """Passes are skipped on an FX-graph cache hit: tests that inspect them compile cold."""
    prev = torch.compiler.config.force_disable_caches
    torch.compiler.config.force_disable_caches = True
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.compiler.config.force_disable_caches = prev
