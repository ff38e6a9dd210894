"""Activation-quant CSE: identical ``fp8_block_quant`` / ``mxfp4_quant`` calls ⇒ the first one.

A model that feeds one activation to two FP8 projections quantizes it once per projection. DSv4's
``q_norm`` output ``qr`` feeds both ``wq_b`` and the indexer's ``wq_b``; written as two projections
(each ``fp8_block_quant(qr, 128)`` + ``fp8_block_gemm``; ``DeepseekV4Attention`` fuses them into one
GEMM instead) that makes two identical calls: two kernel
launches and two passes over the activation for one result. Inductor does not merge custom-op
calls (it cannot know they are pure); these two ops are pure: fresh outputs, nothing written.

What is merged (post-grad, functional graph): a call of the same op with the same arguments (the same
input node, the same block and floor, positionally or by keyword) as an earlier call. The later
call's users are pointed at the earlier call and the later call is erased. A node between the two
that may write the input's storage blocks the merge: a mutating op overload whose written argument
shares the input's fake storage, or any other call (not an op overload) that takes such a tensor,
since the two calls would then read different values.

Replacement: none; the earlier call's ``(q, scale)`` serve both users, so the values are exactly the
plain graph's.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .graph_utils import bound_args, val

dsv4 = torch.ops.dsv4


def _key(x: Any):
    """A hashable form of a node argument (nodes by identity, lists as tuples)."""
    if isinstance(x, (list, tuple)):
        return tuple(_key(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _key(v)) for k, v in x.items()))
    return x


def _storage(node) -> StorageWeakRef | None:
    t = val(node)
    return StorageWeakRef(t.untyped_storage()) if isinstance(t, torch.Tensor) else None


def _tensor_args(x):
    if isinstance(x, fx.Node):
        yield x
    elif isinstance(x, (list, tuple)):
        for a in x:
            yield from _tensor_args(a)


def _may_write(node: fx.Node, storage: StorageWeakRef) -> bool:
    """Whether ``node`` may write ``storage``."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        args = bound_args(node)
        written = [a.name for a in target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        candidates = [n for name in written for n in _tensor_args(args.get(name))]
    else:  # a higher-order op or a Python callable: assume it writes what it takes
        candidates = [n for a in (*node.args, *node.kwargs.values()) for n in _tensor_args(a)]
    return any(_storage(n) == storage for n in candidates)


class QuantCSE:
    """Merges identical activation-quant calls; returns how many calls it removed."""

    name = "quant_cse"
    targets = (dsv4.fp8_block_quant.default, dsv4.mxfp4_quant.default)

    def __call__(self, graph: fx.Graph) -> int:
        nodes = list(graph.nodes)
        seen: dict = {}  # key -> (earlier call, its index in nodes)
        merged = 0
        for i, n in enumerate(nodes):
            if n.op != "call_function" or n.target not in self.targets:
                continue
            args = bound_args(n)
            key = (n.target, _key(args))
            earlier = seen.get(key)
            storage = _storage(args.get("x"))
            if earlier is not None and storage is not None and not any(
                    _may_write(m, storage) for m in nodes[earlier[1] + 1:i]):
                n.replace_all_uses_with(earlier[0])
                graph.erase_node(n)
                merged += 1
            else:
                seen[key] = (n, i)
        return merged
