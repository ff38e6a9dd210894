"""Every op gives identical results for any strides of any tensor argument (issue 12, item 2).

Each op's opcheck cases (from the op family's test module) are re-run with one tensor argument at a
time replaced by a strided view holding the same values, and compared byte for byte with the call on
contiguous arguments — outputs and every mutated cache. Inputs get two layouts: a column of a wider
buffer (every stride doubled: a position column of a token-major metadata buffer) and rows padded past
their length (a slice of a fused projection's output). Mutated caches get their pages placed inside
a wider pool at a nonzero offset (one pool carved into per-layer caches).

On a CPU machine the CUDA implementations (``dsv4_compile.ops._lib.CUDA_KERNELS``, the Triton
launchers) run under ``TRITON_INTERPRET=1`` and the reference (the CPU kernel) runs too; on a GPU the
registered CUDA kernels run through the op.
"""

from __future__ import annotations

import pytest
import torch

import test_attention
import test_cache_ops
import test_compressor
import test_fp8_gemm
import test_indices
import test_ops
import test_output
from dsv4_compile.ops._lib import CUDA_KERNELS

dsv4 = torch.ops.dsv4
HAS_CUDA = torch.cuda.is_available()


def _cases(device):
    """``(op overload, args, kwargs)`` for every op family's opcheck cases."""
    cases = [(op, tuple(args), dict(kw)) for op, args, kw in test_ops._op_cases(device)]
    for mod in (test_cache_ops, test_compressor, test_indices, test_attention):
        cases += [(op, tuple(args), {}) for op, args in mod._op_cases(device)]
    cases += [(dsv4.inv_rope_fp8_quant.default, tuple(args), {}) for args in test_output._op_cases(device)]
    cases += test_fp8_gemm._op_cases(device)
    return cases


def _case_ids():
    return [f"{op._schema.name.split('::')[1]}-{i}" for i, (op, _, _) in enumerate(_cases("cpu"))]


def _mutated(op) -> set[int]:
    return {i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as raw bytes (exact, NaN-safe, fp8-safe)."""
    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _junk_like(shape, dtype, device) -> torch.Tensor:
    """A buffer of recognizable garbage: a kernel that reads it instead of the argument is caught."""
    buf = torch.full(shape, 0x5A, dtype=torch.uint8, device=device) if dtype.itemsize == 1 else None
    if buf is not None:
        return buf.view(dtype)
    if dtype.is_floating_point:
        return torch.full(shape, 3.0e3, dtype=dtype, device=device)
    return torch.full(shape, 7, dtype=dtype, device=device)


def column_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as element ``[..., 1]`` of a ``[*t.shape, 3]`` buffer: every stride tripled."""
    buf = _junk_like((*t.shape, 3), t.dtype, t.device)
    buf.view(torch.uint8 if t.dtype.itemsize == 1 else t.dtype)[..., 1].copy_(
        t.view(torch.uint8) if t.dtype.itemsize == 1 else t)
    return buf[..., 1]


def padded_rows_view(t: torch.Tensor, pad: int = 16) -> torch.Tensor:
    """``t``'s values in the first ``t.shape[-1]`` columns of rows ``pad`` elements longer, starting
    ``pad`` elements into the buffer (last dim contiguous, every other stride larger)."""
    n = t.shape[-1]
    buf = _junk_like((*t.shape[:-1], n + pad), t.dtype, t.device)
    raw = buf.view(torch.uint8) if t.dtype.itemsize == 1 else buf
    raw[..., pad:].copy_(t.view(torch.uint8) if t.dtype.itemsize == 1 else t)
    return buf[..., pad:]


def pooled_cache(cache: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """A copy of a ``uint8 [pages, page_bytes]`` cache whose pages sit ``pad`` bytes into rows of a
    wider pool (the byte layout a cache carved out of one shared allocation has)."""
    pages, nbytes = cache.shape
    pool = torch.full((pages + 1, nbytes + pad), 0xA5, dtype=torch.uint8, device=cache.device)
    view = pool[1:, pad:]
    view.copy_(cache)
    return view


def _run(fn, args, kwargs, mutated):
    args = [a.clone() if i in mutated else a for i, a in enumerate(args)]
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor)], [args[i] for i in sorted(mutated)]


def _strided_variants(op, args, mutated):
    """``(description, args)`` with one tensor argument replaced by each of its strided layouts."""
    for i, (a, arg) in enumerate(zip(args, op._schema.arguments)):
        if not isinstance(a, torch.Tensor) or a.numel() == 0:
            continue
        if a.dtype == torch.uint8 and arg.name.endswith("cache"):  # paged caches take only contiguous pages
            layouts = [("pooled", pooled_cache(a))] if a.dim() == 2 else []
        else:
            layouts = [("column", column_view(a))] + ([("padded rows", padded_rows_view(a))] if a.dim() >= 1 else [])
        for name, view in layouts:
            assert torch.equal(_bytes(view), _bytes(a))
            if view.is_contiguous():  # a size-1 dim: nothing strided to test
                continue
            yield f"arg {i} ({name}, strides {view.stride()})", [view if j == i else b for j, b in enumerate(args)]


def _assert_same_for_every_stride(fn, op, args, kwargs):
    mutated = _mutated(op)
    want_out, want_mut = _run(fn, args, kwargs, mutated)
    for what, sargs in _strided_variants(op, list(args), mutated):
        got_out, got_mut = _run(fn, sargs, kwargs, mutated)
        for w, g in zip(want_out, got_out, strict=True):
            assert torch.equal(_bytes(w), _bytes(g)), f"{op}: output differs with {what}"
        for w, g in zip(want_mut, got_mut, strict=True):
            assert torch.equal(_bytes(w), _bytes(g)), f"{op}: mutated cache differs with {what}"


def test_strided_views_hold_their_values():
    t = torch.arange(12).view(4, 3)
    assert torch.equal(column_view(t[:, 1]), t[:, 1]) and column_view(t[:, 1]).stride() == (3,)
    assert torch.equal(padded_rows_view(t), t) and padded_rows_view(t).stride() == (19, 1)
    c = torch.randint(0, 255, (3, 8), dtype=torch.uint8)
    assert torch.equal(pooled_cache(c), c) and pooled_cache(c).storage_offset() == (8 + 64) + 64


@pytest.mark.parametrize("case", range(len(_case_ids())), ids=_case_ids())
def test_reference_same_result_for_any_strides(case):
    op, args, kwargs = _cases("cpu")[case]
    _assert_same_for_every_stride(op, op, args, kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA kernels run on the GPU in test_cuda_same_result_for_any_strides")
@pytest.mark.parametrize("case", range(len(_case_ids())), ids=_case_ids())
def test_triton_kernels_same_result_for_any_strides(case):
    op, args, kwargs = _cases("cpu")[case]
    _assert_same_for_every_stride(CUDA_KERNELS[op._schema.name.split("::")[1]], op, args, kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(len(_case_ids())), ids=_case_ids())
def test_cuda_same_result_for_any_strides(case):
    op, args, kwargs = _cases("cuda")[case]
    _assert_same_for_every_stride(op, op, args, kwargs)


@pytest.mark.cuda
def test_issue_input_rope_positions_column():
    """The reported input: positions as a column of a token-major buffer (stride 3) against float64
    math of the rotation."""
    from dsv4_compile.rope import cos_sin_cache

    buf = torch.arange(12).view(4, 3).cuda()
    pos = buf[:, 1]
    x = torch.randn(4, 2, 128, device="cuda").bfloat16()
    cs = cos_sin_cache(64, 16, 10000.0, device="cuda")
    got = dsv4.rope(x, pos, cs).double()
    xd, c, s = x.double(), cs[pos, :32].double()[:, None], cs[pos, 32:].double()[:, None]
    xe, xo = xd[..., 64::2], xd[..., 65::2]
    want = xd.clone()
    want[..., 64::2], want[..., 65::2] = xe * c - xo * s, xe * s + xo * c
    assert (got - want).abs().max() < 0.02
