"""Output-path fusion: ``rope(inverse=True) → fp8_block_quant(128)`` ⇒ ``dsv4::inv_rope_fp8_quant``.

What is matched (post-grad, functional graph)::

    y = dsv4.rope(o [T, H, 512] bf16, positions, cos_sin_cache [max_pos, 64], inverse=True)
    q, s = dsv4.fp8_block_quant(y.view(T, G, (H/G)·512), 128, 1e-10)

or, vLLM's bytes, the same with ``rope(o.float(), ...)``: ``o`` bf16 converted to fp32 right before
the rope (an fp32 rotation, nothing rounded to bf16), which becomes the fused op with
``round_rope_bf16=False`` on the bf16 ``o``.

The view may be ``view`` / ``reshape`` / ``_unsafe_view`` to a 3-D shape that keeps the token dim
and whole heads per group, or absent (the quant reads ``y`` itself: G = H). The rope output and the
view must have no other user, the table must be 64 wide (what the fused kernel rotates) and the
quant's floor must be the output path's 1e-10 (fp32-equal), so the fused op computes the same bits.

Replacement: ``o_fp8, scale = dsv4.inv_rope_fp8_quant(o, positions, cos_sin_cache, G[, False])``; users of
``q`` get ``o_fp8`` (same shape ``[T, G, D]``, strides ``(D, T·D, 1)``) and users of ``s`` get
``scale.permute(1, 0, 2)`` (= ``transpose(0, 1)``: the same ``[T, G, D/128]`` values, MN-major
strides). Both are views with the plain graph's values. Where ``s`` is a graph output it is
returned through a contiguous clone (the plain layout; a few bytes per token): Inductor checks
whether an output is dense, and on the MN-major view that check guards on ``T_al != T`` (T % 4),
which would recompile a dynamic-token graph. ``o_fp8`` needs no such care (dense, no padding).

Structural matcher (a graph walk, as ``indexer_q.py``): no per-dtype trace to register; the pass
rewrites only regions whose ``o`` dtype is bf16 and one of the configured model dtypes.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import fx

from dsv4_compile import layouts

from .graph_utils import bound_args, call_with_outputs, fake_call, fp32_of, getitem_users, only_user, same_sizes, val

aten = torch.ops.aten
dsv4 = torch.ops.dsv4

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


class InvRopeQuantFusion:
    """Finds ``rope(inverse) → [view] → fp8_block_quant(128, 1e-10)`` and rewrites each into one
    ``dsv4::inv_rope_fp8_quant``; ``__call__`` returns the count."""

    name = "inv_rope_quant"

    def __init__(self, dtypes: tuple[torch.dtype, ...]):
        self.dtypes = dtypes

    # -- matching ----------------------------------------------------------------------------
    def _match(self, quant: fx.Node) -> Optional[dict]:
        qa = bound_args(quant)
        if qa["block"] != layouts.O_PROJ_QUANT_BLOCK or _f32(qa["scale_floor"]) != _f32(layouts.INV_ROPE_AMAX_FLOOR):
            return None
        src = qa["x"]
        if not isinstance(src, fx.Node):
            return None
        view = None
        if src.target in _VIEWS:
            if only_user(src) is not quant:
                return None
            view, src = src, src.args[0]
            if not isinstance(src, fx.Node):
                return None
        if src.target is not dsv4.rope.default or only_user(src) is not (view or quant):
            return None
        ra = bound_args(src)
        # rope(o.float()): an fp32 rotation of a bf16 o, i.e. the fused op's vLLM mode
        o_node = fp32_of(ra["x"])
        round_bf16 = o_node is None
        o_node = ra["x"] if round_bf16 else o_node
        o, table, grouped = val(o_node), val(ra["cos_sin_cache"]), val(view or src)
        if not ra["inverse"] or o is None or table is None or grouped is None:
            return None
        if o.dtype is not torch.bfloat16 or o.dtype not in self.dtypes or o.dim() != 3:
            return None
        t, h, d = o.shape
        if d != layouts.KV_HEAD_DIM or table.shape[-1] != layouts.ROPE_DIM or not isinstance(h, int):
            return None
        if grouped.dim() != 3 or not same_sizes(grouped.shape[:1], (t,)):
            return None
        g, dg = grouped.shape[1:]
        if not (isinstance(g, int) and isinstance(dg, int)) or g <= 0 or h % g or dg != h // g * d:
            return None
        items = getitem_users(quant)
        if items is None:
            return None
        return dict(rope=src, view=view, args=ra, o=o_node, round_bf16=round_bf16, n_groups=g, items=items)

    # -- rewriting ---------------------------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        quants = list(graph.find_nodes(op="call_function", target=dsv4.fp8_block_quant.default))
        for quant in quants:
            m = self._match(quant)
            if m is None:
                continue
            self._rewrite(graph, quant, m)
            count += 1
        return count

    def _rewrite(self, graph: fx.Graph, quant: fx.Node, m: dict) -> None:
        ra, items = m["args"], m["items"]
        target = dsv4.inv_rope_fp8_quant.default
        op_args = (m["o"], ra["positions"], ra["cos_sin_cache"], m["n_groups"])
        if not m["round_bf16"]:
            op_args += (False,)
        with graph.inserting_before(quant):
            _, (o_fp8, scale) = call_with_outputs(graph, target, op_args, [m["rope"]])
        if 0 in items:
            items[0].replace_all_uses_with(o_fp8)
        if 1 in items:
            # post-grad graphs spell transpose as permute (aten.transpose is decomposed)
            with graph.inserting_after(scale):
                s_t = graph.call_function(aten.permute.default, (scale, [1, 0, 2]))
            s_t.meta["val"] = fake_call(aten.permute.default, (scale, [1, 0, 2]), [scale])
            items[1].replace_all_uses_with(s_t)
            outputs = [u for u in s_t.users if u.op == "output"]
            if outputs:
                # A graph output gets the plain contiguous layout: Inductor's density check of an
                # output would otherwise guard on T_al != T (T % 4) and recompile across token counts.
                clone = functools.partial(aten.clone.default, memory_format=torch.contiguous_format)
                with graph.inserting_after(s_t):
                    c = graph.call_function(aten.clone.default, (s_t,), {"memory_format": torch.contiguous_format})
                c.meta["val"] = fake_call(clone, (s_t,), [s_t])
                for u in outputs:
                    u.replace_input_with(s_t, c)
        convert = None if m["round_bf16"] else ra["x"]
        for n in [*items.values(), quant, m["view"], m["rope"]]:  # consumers first
            if n is not None:
                graph.erase_node(n)
        if convert is not None and not convert.users:
            graph.erase_node(convert)
