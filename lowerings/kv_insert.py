"""``rope → kv_insert`` ⇒ ``kv_rope_insert`` by retargeting the ``auto_functionalized_v2`` node.

Mutating ops reach the post-grad graph functionalized: ``auto_functionalized_v2(dsv4.kv_insert,
kv=..., slot_mapping=..., block_size=..., _kv_cache_base_index=0, _all_bases=[cache])``. The fused
op mutates the same argument (``kv_cache``) and returns nothing, so the v2 bookkeeping kwargs
(``_kv_cache_*``, ``_all_bases``) and the getitem indices stay valid: the node keeps its bases and
outputs, only its op and data arguments change. Inductor's reinplacing then runs the fused op in
place on the cache, exactly as it would have run ``kv_insert``.
"""

from __future__ import annotations

import torch
from torch import fx

from dsv4_compile import layouts

from .graph_utils import bound_args, functionalized_nodes, val

dsv4 = torch.ops.dsv4


def retarget(node: fx.Node, op, data_kwargs: dict) -> None:
    """Point an ``auto_functionalized_v2`` node at ``op`` with new non-mutated kwargs, keeping its
    v2 bookkeeping (``_<arg>_*`` and ``_all_bases``)."""
    kwargs = {k: v for k, v in node.kwargs.items() if k.startswith("_")}
    node.args = (op,)
    node.kwargs = {**data_kwargs, **kwargs}
    node.meta.pop("eager_input_vals", None)  # stale arity would break decompose_auto_functionalized


class KvRopeInsertFusion:
    name = "kv_rope_insert"

    def __init__(self, dtypes: tuple[torch.dtype, ...]):
        self.dtypes = dtypes

    def __call__(self, graph: fx.Graph) -> int:
        matches = 0
        for node in functionalized_nodes(graph, dsv4.kv_insert.default):
            rope = node.kwargs["kv"]
            if not (isinstance(rope, fx.Node) and rope.target is dsv4.rope.default and len(rope.users) == 1):
                continue
            ra = bound_args(rope)
            x, table = val(ra["x"]), val(ra["cos_sin_cache"])
            if ra["inverse"] or x is None or table is None or x.dtype not in self.dtypes:
                continue
            if table.shape[-1] != layouts.ROPE_DIM:
                continue
            retarget(node, dsv4.kv_rope_insert.default, {
                "kv": ra["x"], "positions": ra["positions"], "cos_sin_cache": ra["cos_sin_cache"],
                "slot_mapping": node.kwargs["slot_mapping"], "block_size": node.kwargs["block_size"],
            })
            graph.erase_node(rope)
            matches += 1
        return matches
