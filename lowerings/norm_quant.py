"""Norm-quant fusion: a plain weighted RMSNorm feeding an FP8 activation quant ⇒ ``dsv4::rms_norm_fp8_quant``.

What is matched (post-grad, functional graph), the RMSNorm as ``reference.layer.rms_normalize``
(DSv4's ``q_norm``, whose output only the FP8 ``wq_b`` reads) writes it::

    xf = x.float()                                     # x [..., D] bf16 / fp16
    y = (xf * rsqrt(mean(xf ** 2, -1, keepdim) + eps)) * weight.float()
    q, s = dsv4.fp8_block_quant(y.to(x.dtype), block, scale_floor)

``xf ** 2`` is ``pow(xf, 2)`` (``square`` decomposes to it) and either product may have its operands
in either order; ``eps`` is a Python number, ``weight`` a ``[D]`` tensor, ``block`` a power of two of at
least 16 dividing ``D <= 8192``. Every intermediate but ``weight.float()`` must have no user outside
the chain (``xf``: the square and the product), so the fused op replaces all of it.

Replacement: ``q, s = dsv4.rms_norm_fp8_quant(x, weight, eps, block, scale_floor)``. The fused op's
norm is ``dsv4::rms_norm``'s fixed-order fp32 math (a pairwise tree for the sum of squares, correctly
rounded division and square root, docs/numerics.md §6.4), where the plain graph's is Inductor's own
reduction order and ``rsqrt``: the normalized value can differ in its last fp32 bit, so a bf16
rounding (and then an e4m3 code) can differ from the unfused graph's, within the same rounding
error either way. The pass runs last (after ``quant_cse``: two identical quants of one norm are one
quant with one user then).

Off by default (``PassConfig(rms_norm_quant=True)`` turns it on): the graphed V4-Flash FP8 decode step
on an H200 measured 114 / 225 µs at B = 1 / 64 with it and 111 / 221 µs without
(``benchmarks/decode_step.py --batches 1 64 --contexts 8192 --weight-formats fp8``, with and without
``--disable-passes rms_norm_quant`` while it was on): at decode sizes the Inductor norm kernel and the
quant kernel, chained by programmatic dependent launch, cost what the one fused kernel does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from .graph_utils import bound_args, call_with_outputs, fp32_of, getitem_users, single_user_call, val

aten = torch.ops.aten
prims = torch.ops.prims
dsv4 = torch.ops.dsv4

MAX_DIM = 8192  # what dsv4::rms_norm_fp8_quant takes


def _other(mul: fx.Node, node: fx.Node):
    """The operand of a two-operand ``mul`` that is not ``node`` (None if ``node`` is not one)."""
    a, b = mul.args[:2]
    return b if a is node else a if b is node else None


class RmsNormQuantFusion:
    """Finds ``RMSNorm(x)·w → .to(x.dtype) → fp8_block_quant`` and rewrites each into one
    ``dsv4::rms_norm_fp8_quant``; ``__call__`` returns the count."""

    name = "rms_norm_quant"

    def __init__(self, dtypes: tuple[torch.dtype, ...]):
        self.dtypes = dtypes

    def _match(self, quant: fx.Node) -> Optional[dict]:
        qa = bound_args(quant)
        block, y = qa["block"], qa["x"]
        if not single_user_call(y, prims.convert_element_type.default):
            return None
        out_dtype, scaled = y.args[1], y.args[0]
        if not single_user_call(scaled, aten.mul.Tensor):
            return None
        # (xf * r) * weight.float(): find the weight side, then the normalized side
        for side in scaled.args[:2]:
            w = fp32_of(side)
            normed = _other(scaled, side) if w is not None else None
            if single_user_call(normed, aten.mul.Tensor):
                break
        else:
            return None
        for r in normed.args[:2]:
            xf = _other(normed, r)
            if single_user_call(r, aten.rsqrt.default) and isinstance(xf, fx.Node):
                break
        else:
            return None
        add = r.args[0]
        if not (single_user_call(add, aten.add.Tensor) or single_user_call(add, aten.add.Scalar)) or add.kwargs:
            return None
        mean, eps = add.args[:2]
        if (not isinstance(eps, float) or eps <= 0 or not single_user_call(mean, aten.mean.dim)
                or mean.kwargs.get("dtype") is not None):
            return None
        sq = mean.args[0]
        dims = mean.args[1] if len(mean.args) > 1 else None
        keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if not single_user_call(sq, aten.pow.Tensor_Scalar) or sq.args[0] is not xf or sq.args[1] != 2 or not keep:
            return None
        x = fp32_of(xf)
        xv, wv, yv = val(x), val(w), val(y)
        if x is None or xv is None or wv is None or yv is None or set(xf.users) != {sq, normed}:
            return None
        d = xv.shape[-1]
        if list(dims or []) not in ([-1], [xv.dim() - 1]) or not isinstance(d, int):
            return None
        if (xv.dtype not in self.dtypes or out_dtype != xv.dtype or wv.dim() != 1 or wv.shape[0] != d
                or d > MAX_DIM or not isinstance(block, int) or block < 16 or block & (block - 1) or d % block):
            return None
        items = getitem_users(quant)
        if items is None:
            return None
        chain = [y, scaled, side, normed, r, add, mean, sq, xf]
        return dict(x=x, weight=w, eps=eps, block=block, floor=qa["scale_floor"], items=items, chain=chain)

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        for quant in list(graph.find_nodes(op="call_function", target=dsv4.fp8_block_quant.default)):
            m = self._match(quant)
            if m is None:
                continue
            target = dsv4.rms_norm_fp8_quant.default
            args = (m["x"], m["weight"], m["eps"], m["block"], m["floor"])
            with graph.inserting_before(quant):
                _, outs = call_with_outputs(graph, target, args, [m["x"]])
            for i, item in m["items"].items():
                item.replace_all_uses_with(outs[i])
            for n in [*m["items"].values(), quant, *m["chain"]]:  # consumers first
                if not n.users:
                    graph.erase_node(n)
            count += 1
        return count
