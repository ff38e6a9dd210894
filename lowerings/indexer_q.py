"""Indexer-q fusion: ``rope → [hadamard] → fp8_block_quant|mxfp4_quant`` + the weight scaling
⇒ one ``dsv4::indexer_q_rope_fp8`` / ``dsv4::indexer_q_rope_mxfp4`` call.

What is matched (post-grad, functional graph):

* ``y = dsv4.rope(q [T,H,D], positions, cos_sin_cache, inverse=False)``, optionally
  ``y = dsv4.hadamard(y, D^-0.5)``, each intermediate used only by the next step;
* FP8: ``q_fp8, q_scale = dsv4.fp8_block_quant(y, block=D, scale_floor=1e-4)`` and the product
  ``weights.float() · c1 · c2 · … · q_scale.squeeze(-1)`` (any order, any number of scalar factors,
  ``q_scale`` reduced to ``[T, H]`` by squeeze / reshape / select);
* MXFP4: ``packed, scale = dsv4.mxfp4_quant(y)`` and the one product ``weights.float() · c1 · …`` (or
  ``weights · c1 · …`` for fp32 weights, as the layer's fp32 ``weights_proj`` columns) of shape
  ``[T, H]`` in the graph (no data edge ties it to the quant, so it must be unambiguous).

Scale folding: Python-constant factors are folded into ``weight_scale``. One constant gives
``weights_out`` bit-identical to eager; a chain of k constants is folded into their product,
computed once in float64, so ``weights_out`` is rounded twice (constant, product) where eager rounds
k times: the two differ by the chain's extra rounding steps, at most 2 fp32 ulps in the tests. Factors that are runtime scalars (e.g. floats Dynamo lifted to graph inputs
under ``dynamic=True``) cannot be folded: the fused op then gets ``weight_scale = 1`` and the original
chain of multiplies is re-applied to ``weights_out`` in its original order. Multiplying by the
power-of-two q scale commutes exactly with fp32 rounding, so that path stays bit-identical.

The matcher is structural (it walks the graph instead of tracing a search function), so there is
no per-dtype trace to register; instead the pass rewrites only regions whose ``q`` dtype is one of the
configured model dtypes, which the kernels support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import fx

from dsv4_compile import layouts

from .graph_utils import bound_args, call_with_outputs, fake_call, fp32_of, getitem_users, only_user, same_sizes, val

aten = torch.ops.aten
dsv4 = torch.ops.dsv4

_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_SCALE_VIEWS = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.reshape.default, aten.view.default,
                aten._unsafe_view.default, aten.select.int)


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@dataclass
class _Product:
    """A chain of multiplies ``leaf · f1 · f2 · …`` rooted at ``root``."""

    weights: fx.Node  # the tensor handed to the fused op as ``weights``
    nodes: list[fx.Node]  # the mul nodes, leaf to root
    factors: list[Union[float, fx.Node, str]] = field(default_factory=list)  # "scale" marks q_scale

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]


def _is_runtime_scalar(a) -> bool:
    v = val(a)
    return isinstance(v, torch.Tensor) and v.dim() == 0


def _scale_leaf(getitem_scale: fx.Node, t_h) -> Optional[fx.Node]:
    """Follow ``q_scale [T,H,1]`` through shape-only ops to a ``[T,H]`` node used by one mul."""
    node = getitem_scale
    while True:
        user = only_user(node)
        if user is None:
            return None
        if user.target in _MULS:
            v = val(node)
            return node if v is not None and same_sizes(v.shape, t_h) else None
        if user.target not in _SCALE_VIEWS:
            return None
        if user.target is aten.select.int and not (user.args[1] in (-1, 2) and user.args[2] == 0):
            return None
        node = user


def _walk_product(leaf: fx.Node, scale_leaf: Optional[fx.Node], t_h) -> Optional[_Product]:
    """Walk up from the weights leaf through single-user multiplies. Every other operand must be a
    Python number, a 0-d runtime scalar, or (once, FP8) the q-scale leaf."""
    weights = fp32_of(leaf)  # X for X.float(), else the fp32 leaf itself (below)
    if weights is None:
        v = val(leaf)
        if v is None or v.dtype != torch.float32:
            return None
        weights = leaf
    prod = _Product(weights=weights, nodes=[])
    node = leaf
    seen_scale = False
    while True:
        user = only_user(node)
        if user is None or user.target not in _MULS or len(user.args) != 2:
            break
        other = user.args[1] if user.args[0] is node else user.args[0]
        if other is node:
            break
        if scale_leaf is not None and other is scale_leaf and not seen_scale:
            prod.factors.append("scale")
            seen_scale = True
        elif isinstance(other, (int, float)) and not isinstance(other, bool):
            prod.factors.append(float(other))
        elif isinstance(other, fx.Node) and _is_runtime_scalar(other):
            prod.factors.append(other)
        else:
            break
        prod.nodes.append(user)
        node = user
    if not prod.nodes or (scale_leaf is not None and not seen_scale):
        return None
    v_root, v_w = val(prod.root), val(weights)
    if v_root is None or v_w is None or v_root.dtype != torch.float32:
        return None
    if not (same_sizes(v_root.shape, t_h) and same_sizes(v_w.shape, t_h)):
        return None
    return prod


def _mxfp4_leaf(node: fx.Node, t_h) -> bool:
    """A possible start of the MXFP4 weights product: ``X.float()``, or an fp32 ``[T, H]`` value that is
    not itself a product (the layer's fp32 ``weights_proj`` columns)."""
    if node.op not in ("call_function", "placeholder"):
        return False
    if fp32_of(node) is not None:
        return True
    v = val(node)
    return (node.target not in _MULS and isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 2
            and same_sizes(v.shape, t_h))


class IndexerQFusion:
    """Finds indexer-q regions and rewrites each into one fused op; ``__call__`` returns the count."""

    name = "indexer_q"

    def __init__(self, dtypes: tuple[torch.dtype, ...]):
        self.dtypes = dtypes

    # -- matching ----------------------------------------------------------------------------
    def _region(self, quant: fx.Node):
        """(rope node, hadamard flag, getitems) if ``quant`` is fed by a fusable rope[/hadamard]."""
        src = quant.args[0]
        hadamard = False
        if not isinstance(src, fx.Node):
            return None
        if src.target is dsv4.hadamard.default:
            if only_user(src) is not quant:
                return None
            d = val(src).shape[-1]
            if _f32(bound_args(src)["scale"]) != _f32(d**-0.5):
                return None
            hadamard, src = True, src.args[0]
            if not isinstance(src, fx.Node):
                return None
            expected_user = quant.args[0]
        else:
            expected_user = quant
        if src.target is not dsv4.rope.default or only_user(src) is not expected_user:
            return None
        rope = bound_args(src)
        q_val, cs_val = val(rope["x"]), val(rope["cos_sin_cache"])
        if rope["inverse"] or q_val is None or cs_val is None or q_val.dim() != 3:
            return None
        if q_val.dtype not in self.dtypes:
            return None
        d = q_val.shape[-1]
        if not isinstance(d, int) or d < layouts.MXFP4_BLOCK or d > 1024 or d & (d - 1):
            return None
        items = getitem_users(quant)
        if items is None:
            return None
        return src, hadamard, items

    # -- rewriting ---------------------------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> int:
        count = 0
        quants = [n for n in graph.nodes if n.op == "call_function"
                  and n.target in (dsv4.fp8_block_quant.default, dsv4.mxfp4_quant.default)]
        for quant in quants:
            region = self._region(quant)
            if region is None:
                continue
            rope, hadamard, items = region
            q_val = val(bound_args(rope)["x"])
            t_h = tuple(q_val.shape[:2])
            scale_leaf = None
            if quant.target is dsv4.fp8_block_quant.default:
                qa = bound_args(quant)
                if qa["block"] != q_val.shape[-1] or _f32(qa["scale_floor"]) != _f32(layouts.FP8_AMAX_FLOOR):
                    continue
                scale_leaf = _scale_leaf(items[1], t_h) if 1 in items else None
                leaf = _chain_leaf(only_user(scale_leaf), scale_leaf) if scale_leaf is not None else None
                prod = _walk_product(leaf, scale_leaf, t_h) if leaf is not None else None
            else:
                cands = [p for p in (_walk_product(n, None, t_h) for n in graph.nodes if _mxfp4_leaf(n, t_h)) if p]
                prod = cands[0] if len(cands) == 1 else None
            if prod is None:
                continue
            self._rewrite(graph, quant, rope, hadamard, items, prod, scale_leaf)
            count += 1
        return count

    def _rewrite(self, graph, quant, rope, hadamard, items, prod: _Product, scale_leaf):
        fp8 = quant.target is dsv4.fp8_block_quant.default
        args = bound_args(rope)
        runtime = any(isinstance(f, fx.Node) for f in prod.factors)
        weight_scale = 1.0
        if not runtime:
            for f in prod.factors:
                if isinstance(f, float):
                    weight_scale *= f
        target = dsv4.indexer_q_rope_fp8.default if fp8 else dsv4.indexer_q_rope_mxfp4.default
        op_args = (args["x"], args["positions"], args["cos_sin_cache"], prod.weights, weight_scale, hadamard)

        # Insert after the last input in graph order (the stable topological sort tidies up after).
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max((a for a in op_args if isinstance(a, fx.Node)), key=order.__getitem__)
        with graph.inserting_after(anchor):
            fused, outs = call_with_outputs(graph, target, op_args, [rope])
        w_out = outs[-1]
        if runtime:
            # Re-apply the unfoldable chain (minus the power-of-two q scale) in its original order.
            with graph.inserting_after(outs[-1]):
                for f in prod.factors:
                    if isinstance(f, str):
                        continue
                    m = graph.call_function(aten.mul.Tensor, (w_out, f))
                    m.meta["val"] = fake_call(aten.mul.Tensor, (w_out, f), [w_out])
                    w_out = m

        if 0 in items:
            items[0].replace_all_uses_with(outs[0])
        if not fp8 and 1 in items:
            items[1].replace_all_uses_with(outs[1])
        prod.root.replace_all_uses_with(w_out)

        # Erase the matched region, consumers before producers.
        dead = list(reversed(prod.nodes)) + [prod.nodes[0].args[0], prod.nodes[0].args[1]]
        node = scale_leaf
        while node is not None and node is not items.get(1):
            dead.append(node)
            node = node.args[0]
        dead += list(items.values()) + [quant, quant.args[0], rope]
        erased = set()
        for n in dead:
            if isinstance(n, fx.Node) and n.op == "call_function" and not n.users and n not in erased:
                graph.erase_node(n)
                erased.add(n)


def _chain_leaf(mul: Optional[fx.Node], scale_leaf: fx.Node) -> Optional[fx.Node]:
    """From the mul that consumes the q scale, descend through single-user multiplies by scalars to
    the chain's tensor leaf (``weights.float()``)."""
    node = mul
    while node is not None and node.target in _MULS:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a is not scale_leaf and not _is_runtime_scalar(a)]
        if len(tensors) != 1:
            return None
        t = tensors[0]
        if t.target in _MULS and only_user(t) is node:
            node = t
            continue
        return t
    return None
