"""Caches carved out of one storage: run their dsv4 mutations in place, with no clone or copy-back.

vLLM allocates every layer's KV cache as a view into one raw buffer. AOTAutograd proves such views
do not overlap and passes them as separate graph inputs, but Inductor's re-inplacing keys its
bookkeeping on *storages*: once one base of an ``auto_functionalized_v2`` node is re-inplaced, any
other base of the same node on the same storage is cloned and copied back after the op
(``tensor_with_same_storage_already_reinplaced`` in ``torch/_inductor/fx_passes/reinplace.py``; a
``TODO`` there). ``dsv4::compressor_insert`` writes the compressor state *and* the compressed (or
indexer K) cache, so with one pool every step cloned and copied back both caches whole.

This pass decides those nodes itself. A dsv4 ``auto_functionalized_v2`` node whose bases share a
storage with another graph input becomes a direct call of the mutating op on those inputs when that
is provably what the program means:

* every mutated argument is its base (no view to regenerate), and every base is a graph input;
* no two bases, and no base and any other graph input, overlap in memory (the fake tensors' sizes,
  strides and offsets; AOTAutograd gives overlapping inputs a synthetic base, which is left alone);
* nothing reads a base's old value after the node: every other user of the input (through views,
  and the ``getitem`` outputs of multi-output views such as ``split``) comes before it, except
  AOTAutograd's ``copy_`` of the new value back into the input;
* the node does not also read a base (or a view of it) as a non-mutated argument.

Later users of the node's results then read the input itself, which now holds the new value, and the
``copy_(input, input)`` left over is dropped. Anything else is left to Inductor, which clones where
the program needs it: never silently — a ``UserWarning`` names the op. This runs before Inductor's
own re-inplacing, inside ``DSV4PassManager``.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from .checks import _is_view

aten = torch.ops.aten


def _storage(node: fx.Node):
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or not torch._C._has_storage(v):
        return None
    return v.untyped_storage()._cdata


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch._C._dynamo.guards import compute_overlapping_tensors
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        return len(compute_overlapping_tensors([a, b])) != 0
    except GuardOnDataDependentSymNode:
        return True


def _is_copy_back(user: fx.Node, base: fx.Node) -> bool:
    return user.target is aten.copy_.default and user.args[0] is base


def _old_value_read_after(base: fx.Node, node: fx.Node, order: dict) -> bool:
    """Whether any user of ``base`` (through views) other than ``node`` and a copy-back into
    ``base`` runs after ``node``."""
    todo = [base]
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user is node or (cur is base and _is_copy_back(user, base)):
                continue
            if order[user] > order[node]:
                return True
            if _is_view(user) or (user.target is operator.getitem and cur is not base):
                todo.append(user)  # getitem: an output of a multi-output view (split, unbind, chunk)
    return False


def _root(n):
    while isinstance(n, fx.Node) and n.op == "call_function" and n.args and (
            _is_view(n) or n.target is operator.getitem):
        n = n.args[0]
    return n


def _rewritable(node: fx.Node, shared: dict, order: dict) -> bool:
    op = node.args[0]
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "dsv4" or op._schema.returns:
        return False
    kwargs, bases = node.kwargs, node.kwargs["_all_bases"]
    mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    for name in mutated:
        if not isinstance(kwargs.get(f"_{name}_base_index"), int):
            return False
        if any(k.startswith(f"_{name}_") and k != f"_{name}_base_index" for k in kwargs):
            return False  # a view of its base: leave it to Inductor
    if len(set(bases)) != len(bases) or any(b.op != "placeholder" for b in bases):
        return False
    read = {_root(v) for k, v in kwargs.items() if not k.startswith("_") and isinstance(v, fx.Node)}
    if read & set(bases):
        return False  # in place, the op would read what it writes
    for b in bases:
        for other in shared.get(_storage(b), ()):
            if other is not b and _overlap(b.meta["val"], other.meta["val"]):
                return False
        if _old_value_read_after(b, node, order):
            return False
    return True


def inplace_shared_storage_mutations(graph: fx.Graph) -> int:
    """Rewrite the dsv4 ``auto_functionalized_v2`` nodes described in the module docstring into
    in-place calls; returns how many."""
    shared: dict = {}
    for n in graph.nodes:
        if n.op == "placeholder" and _storage(n) is not None:
            shared.setdefault(_storage(n), []).append(n)
    shared = {s: ns for s, ns in shared.items() if len(ns) > 1}
    if not shared:
        return 0
    rewritten = 0
    order = {n: i for i, n in enumerate(graph.nodes)}  # kept current: a rewrite's call takes its node's place
    for node in list(graph.nodes):
        if node.target is not auto_functionalized_v2:
            continue
        if not any(_storage(b) in shared for b in node.kwargs["_all_bases"]):
            continue  # bases on storages of their own: Inductor re-inplaces them
        if not _rewritable(node, shared, order):
            warnings.warn(f"dsv4: {node.args[0]} writes caches that share a storage with another graph input, "
                          f"and making it in place could not be shown legal: Inductor will clone and copy "
                          f"them back on every step (see lowerings/shared_storage.py)", stacklevel=2)
            continue
        op, kwargs, bases = node.args[0], dict(node.kwargs), node.kwargs["_all_bases"]
        call_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        for a in op._schema.arguments:
            if a.alias_info is not None and a.alias_info.is_write:
                call_kwargs[a.name] = bases[kwargs[f"_{a.name}_base_index"]]
        with graph.inserting_before(node):
            call = graph.call_function(op, kwargs=call_kwargs)
        call.meta["val"] = None
        order[call] = order[node]
        first_base = len(node.meta["val"]) - len(bases)  # the results: (op's output (None), *new bases)
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] < first_base:
                raise AssertionError(f"unexpected user {user.format_node()} of {node.format_node()}")
            user.replace_all_uses_with(bases[user.args[1] - first_base])
            graph.erase_node(user)
        graph.erase_node(node)
        rewritten += 1
    for n in list(graph.nodes):  # copy_(x, x) left where a copy-back read the node's result
        if n.target is aten.copy_.default and n.args[0] is n.args[1] and not n.users:
            graph.erase_node(n)
    return rewritten
