"""The compressor chain ⇒ one ``dsv4::compressor_insert``.

Matched (post-grad, functionalized), for the main (``kv_insert``) and the indexer
(``indexer_k_insert``, optional ``hadamard(·, d^-0.5)``) compressors::

    af2(compressor_state_save, kv_score, positions, ape, state_slot_mapping, sbs; base S)
    pooled = compressor_pool(getitem(that, S), positions, block_table, token_to_req, sbs, r, d)
    y = rope(rms_norm(pooled, w, eps), (positions // r) * r, cos_sin_cache)
    y = convert_element_type(y, bf16) [→ hadamard(y, d^-0.5)]
    af2(kv_insert | indexer_k_insert, y, slot_mapping, bs[, fmt]; base C)

Every intermediate must have this chain as its only user. The two ``auto_functionalized_v2``
nodes become one that mutates both bases (``_state_cache_*`` and ``_cache_*`` bookkeeping carried
over from the old nodes, ``_all_bases = [S, C]``); the getitems of the old bases are redirected to
the new node's, so the copy-back epilogue and later readers see the same values, and Inductor
reinplaces the fused op on both caches.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from dsv4_compile import layouts

from .graph_utils import base_getitems, bound_args, functionalized_nodes, single_user_call, val

dsv4 = torch.ops.dsv4
aten = torch.ops.aten
BASES_AT = 1  # an op returning () has its new bases at getitem indices 1, 2, ... of the v2 node


def _is_window_start(node, positions, r) -> bool:
    """``node`` computes ``(positions // r) * r`` (floor division, as traced from ``positions // r * r``)."""
    if not (isinstance(node, fx.Node) and node.target is aten.mul.Tensor and len(node.args) == 2):
        return False
    div, factor = node.args
    if factor != r or not isinstance(div, fx.Node):
        return False
    if div.target is aten.div.Tensor_mode:
        return div.args[0] is positions and div.args[1] == r and div.kwargs.get("rounding_mode") == "floor"
    if div.target is aten.floor_divide.default:
        return div.args[0] is positions and div.args[1] == r
    return False


def _bookkeeping(node: fx.Node, old: str, new: str, index: int) -> dict:
    """The v2 kwargs that describe mutable arg ``old`` of ``node`` (view info), renamed to ``new``."""
    out = {f"_{new}_base_index": index}
    prefix = f"_{old}_"
    for k, v in node.kwargs.items():
        if k.startswith(prefix) and k != f"_{old}_base_index":
            out[f"_{new}_" + k[len(prefix):]] = v
    return out


class CompressorFusion:
    """Dtypes are fixed by the chain itself (fp32 state and norm, a bf16 cast before the insert), so
    this fusion has no model-dtype gate."""

    name = "compressor"

    def _match(self, ins: fx.Node):
        """The chain feeding insert node ``ins``, or None."""
        if ins.args[0] is dsv4.kv_insert.default:
            x, fmt, mut = ins.kwargs["kv"], "fp8_ds_mla", "kv_cache"
        else:
            x, fmt, mut = ins.kwargs["k"], ins.kwargs["fmt"], "cache"
        hadamard = False
        if single_user_call(x, dsv4.hadamard.default):
            if fmt == "fp8_ds_mla" or x.args[1] != layouts.INDEXER_HEAD_DIM**-0.5:
                return None
            hadamard, x = True, x.args[0]
        if not (single_user_call(x, torch.ops.prims.convert_element_type.default) and x.args[1] is torch.bfloat16):
            return None
        rope = x.args[0]
        if not single_user_call(rope, dsv4.rope.default):
            return None
        ra = bound_args(rope)
        table = val(ra["cos_sin_cache"])
        if ra["inverse"] or table is None or table.shape[-1] != layouts.ROPE_DIM:
            return None  # the fused op rotates exactly the last 64 dims
        norm = ra["x"]
        if not single_user_call(norm, dsv4.rms_norm.default):
            return None
        pool = norm.args[0]
        if not single_user_call(pool, dsv4.compressor_pool.default):
            return None
        pa = bound_args(pool)
        state = pa["state_cache"]
        if not (isinstance(state, fx.Node) and state.target is operator.getitem):
            return None
        save = state.args[0]
        if not (save.target is auto_functionalized_v2 and save.args[0] is dsv4.compressor_state_save.default):
            return None
        if state.args[1] != BASES_AT + save.kwargs["_state_cache_base_index"] or "_state_cache_size" in save.kwargs \
                or "_state_cache_slice_dim" in save.kwargs:
            return None  # the pool must read the whole state cache the save wrote
        positions, r = save.kwargs["positions"], pa["compress_ratio"]
        ape = val(save.kwargs["ape"])
        if pa["positions"] is not positions or ape is None or ape.shape[0] != r:
            return None
        if pa["state_block_size"] != save.kwargs["state_block_size"]:
            return None
        if not _is_window_start(ra["positions"], positions, r):
            return None
        chain = ([ins.kwargs.get("kv", ins.kwargs.get("k"))] if hadamard else []) + [x, rope, norm, pool]
        return dict(save=save, pool=pool, pa=pa, norm=norm, rope=rope, ra=ra, fmt=fmt, mut=mut,
                    hadamard=hadamard, chain=chain)

    def __call__(self, graph: fx.Graph) -> int:
        matches = 0
        inserts = functionalized_nodes(graph, dsv4.kv_insert.default) + functionalized_nodes(
            graph, dsv4.indexer_k_insert.default)
        for ins in inserts:
            m = self._match(ins)
            if m is None:
                continue
            self._rewrite(graph, ins, m)
            matches += 1
        return matches

    def _rewrite(self, graph: fx.Graph, ins: fx.Node, m: dict) -> None:
        save, pa, ra = m["save"], m["pa"], m["ra"]
        state_base = save.kwargs["_all_bases"][save.kwargs["_state_cache_base_index"]]
        cache_base = ins.kwargs["_all_bases"][ins.kwargs[f"_{m['mut']}_base_index"]]
        kwargs = {
            "kv_score": save.kwargs["kv_score"], "positions": save.kwargs["positions"], "ape": save.kwargs["ape"],
            "state_slot_mapping": save.kwargs["state_slot_mapping"],
            "state_block_table": pa["state_block_table"], "token_to_req": pa["token_to_req"],
            "state_block_size": pa["state_block_size"], "norm_weight": m["norm"].args[1], "eps": m["norm"].args[2],
            "cos_sin_cache": ra["cos_sin_cache"], "slot_mapping": ins.kwargs["slot_mapping"],
            "block_size": ins.kwargs["block_size"], "fmt": m["fmt"], "hadamard": m["hadamard"],
            **_bookkeeping(save, "state_cache", "state_cache", 0),
            **_bookkeeping(ins, m["mut"], "cache", 1),
            "_all_bases": [state_base, cache_base],
        }
        old_state = base_getitems(save)
        old_cache = base_getitems(ins)
        with graph.inserting_before(ins):
            fused = graph.call_function(auto_functionalized_v2, (dsv4.compressor_insert.default,), kwargs)
            new_state = graph.call_function(operator.getitem, (fused, BASES_AT))
            new_cache = graph.call_function(operator.getitem, (fused, BASES_AT + 1))
        s_idx = BASES_AT + save.kwargs["_state_cache_base_index"]
        c_idx = BASES_AT + ins.kwargs[f"_{m['mut']}_base_index"]
        new_state.meta["val"] = old_state[s_idx].meta.get("val")
        new_cache.meta["val"] = old_cache[c_idx].meta.get("val") if c_idx in old_cache else val(cache_base)
        fused.meta["val"] = (None, new_state.meta["val"], new_cache.meta["val"])
        if c_idx in old_cache:
            old_cache[c_idx].replace_all_uses_with(new_cache)
        old_state[s_idx].replace_all_uses_with(new_state)
        # the old chain is dead now: insert (+ its getitems), [hadamard], cast, rope, norm, pool, save
        for n in [*old_cache.values(), ins]:
            graph.erase_node(n)
        for n in m["chain"]:  # consumer first, so each is dead when erased
            graph.erase_node(n)
        window = ra["positions"]
        for n in (window, window.args[0]):
            if isinstance(n, fx.Node) and not n.users:
                graph.erase_node(n)
        for n in list(base_getitems(save).values()):
            if not n.users:
                graph.erase_node(n)
        if not save.users:
            graph.erase_node(save)
