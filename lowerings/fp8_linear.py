"""FP8 projection fusion: ``fp8_block_quant(x, 128) → fp8_block_gemm`` ⇒ ``dsv4::fp8_linear``.

What is matched (post-grad, functional graph)::

    x_q, x_scale = dsv4.fp8_block_quant(x [M, K], 128, floor)
    y = dsv4.fp8_block_gemm(x_q, x_scale, w, s[, out_dtype])      # its one user

where the one user of ``x_q`` and ``x_scale`` is such a 2-D GEMM taking them as its activations
(the model's ``wq_a``+``wkv`` on ``x``, ``q_proj`` on the q latent, ``wo_b`` on ``z``). Replacement:
the GEMM becomes ``dsv4.fp8_linear(x, w, s, out_dtype, floor)`` and the quant goes; where the op
fuses (below) no FP8 activations reach memory and the quant costs no launch. A quant with any other
user (its FP8 values stored, say) is left alone, as is one feeding several GEMMs (the quant-CSE pass,
which runs first, makes one of repeated quants: fused, each GEMM would quantize again), and the
grouped (3-D) GEMM of ``wo_a``, whose input comes quantized from the fused output quant.

On by default (``PassConfig.fp8_linear``). The op decides at run time where the quant goes
(``kernels/triton/gemm.py``): one row with K ≤ 4096 quantizes inside the GEMV (unless the GEMM gives
that row to the CuTe-DSL kernel: K ≤ 2048 on Hopper), everything else runs the quant kernel, then the
GEMM, so the rewrite costs nothing where fusing does not pay. Measured on an
H200 at M = 1: ``wq_a+wkv`` 3.2 µs fused against 3.1 + 1.3 µs, ``q_proj`` 13.5 against 13.1 + 1.1 µs
(``benchmarks/results/projections_h200.md``). Before the GEMV (the tiled kernel quantizing in its
prologue, every N tile again) it lost from M = 32 and on the wide projections, and was off.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from dsv4_compile.reference.gemm import BLOCK

from .graph_utils import bound_args, fake_call, getitem_users, only_user, val

dsv4 = torch.ops.dsv4


class Fp8LinearFusion:
    """Finds ``fp8_block_quant(x, 128) → fp8_block_gemm`` (the quant's one user) and rewrites the GEMM
    into one ``dsv4::fp8_linear``; ``__call__`` returns the number of GEMMs rewritten."""

    name = "fp8_linear"

    def _match(self, quant: fx.Node) -> Optional[dict]:
        qa = bound_args(quant)
        x = qa["x"]
        xv = val(x)
        if qa["block"] != BLOCK or xv is None or xv.dim() != 2:
            return None
        items = getitem_users(quant)
        if items is None or set(items) != {0, 1}:
            return None
        g = only_user(items[0])  # one quant for several GEMMs stays one
        if g is None or g.target is not dsv4.fp8_block_gemm.default or only_user(items[1]) is not g:
            return None
        ga = bound_args(g)
        if ga["x_q"] is not items[0] or ga["x_scale"] is not items[1] or items[0] in (ga["w_q"], ga["w_scale"]):
            return None
        return dict(x=x, floor=qa["scale_floor"], items=items, gemm=g, gemm_args=ga)

    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        for quant in list(graph.find_nodes(op="call_function", target=dsv4.fp8_block_quant.default)):
            m = self._match(quant)
            if m is None:
                continue
            g, ga, target = m["gemm"], m["gemm_args"], dsv4.fp8_linear.default
            args = (m["x"], ga["w_q"], ga["w_scale"], ga["out_dtype"], m["floor"])
            with graph.inserting_before(g):
                fused = graph.call_function(target, args)
            fused.meta["val"] = fake_call(target, args, [g, m["x"]])
            g.replace_all_uses_with(fused)
            for n in (g, *m["items"].values(), quant):
                graph.erase_node(n)
            count += 1
        return count
