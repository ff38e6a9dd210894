"""Graph checks for compiled DSv4 code: no clone or copy-back of any cache, no host syncs.

Run them on the *final* post-grad graph (after Inductor's reinplacing and the decomposition of
``auto_functionalized_v2``), which ``capture_final_graphs()`` records::

    with capture_final_graphs() as graphs:
        compiled(*args)
    for gm in graphs:
        assert_graph_ok(gm.graph)

A cache is any graph input that the graph mutates (it is passed as a mutated argument of a dsv4 op
or is the destination of a ``copy_``) or any ``uint8`` input of rank ≥ 2 (the byte caches). A
violation is a clone / copy of such a tensor (or of a view of it), or a ``copy_`` into it from a
different tensor: each costs a full pass over the cache per step and breaks in-place semantics.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

_COPIES = {aten.clone.default, aten.copy.default, aten._to_copy.default, prims.clone.default}
_SYNCS = {
    aten._local_scalar_dense.default, aten.item.default, aten._assert_async.default, aten._assert_async.msg,
    aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.nonzero_static.default,
}


@contextlib.contextmanager
def capture_final_graphs(require: bool = True) -> Iterator[list[fx.GraphModule]]:
    """Record every graph Inductor lowers while the block runs (its final post-grad form).

    Inductor's FX-graph and AOTAutograd caches are off inside the block (a warm cache returns compiled
    code without lowering a graph, so there would be nothing to check). With ``require=True`` a block
    that lowered no graph at all raises ``AssertionError`` — a function compiled before the block is
    served by Dynamo's cache: ``torch._dynamo.reset()`` first — so a loop of ``assert_graph_ok`` over
    the result never checks nothing."""
    from torch._inductor import config as inductor_config
    from torch._inductor import graph as graph_mod

    captured: list[fx.GraphModule] = []
    original = graph_mod.GraphLowering.__init__

    def init(self, gm, *args, **kwargs):
        if not any(gm is g for g in captured):
            captured.append(gm)
        return original(self, gm, *args, **kwargs)

    graph_mod.GraphLowering.__init__ = init
    try:
        with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            yield captured
    finally:
        graph_mod.GraphLowering.__init__ = original
    if require and not captured:
        raise AssertionError("capture_final_graphs: no graph was lowered inside the block (already compiled and "
                             "served by Dynamo's cache?): call torch._dynamo.reset() or compile inside the block")


def _is_view(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and (
        t.is_view or t in (aten.reshape.default, aten.slice.Tensor, aten.select.int, aten.view.dtype))


def _returns_self(node: fx.Node) -> bool:
    """An in-place op (``index_put_``, ``copy_``...) whose result aliases its mutated first argument."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload) or not t._schema.returns or not t._schema.arguments:
        return False
    ret, first = t._schema.returns[0].alias_info, t._schema.arguments[0].alias_info
    return ret is not None and first is not None and first.is_write and set(ret.before_set) == set(first.before_set)


def _root(node):
    """The tensor a chain of views and in-place results starts from."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.args and (
            _is_view(node) or _returns_self(node)):
        node = node.args[0]
    return node


def cache_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Placeholders that are caches (see the module docstring)."""
    caches = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() >= 2:
                caches.add(n)
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            schema = n.target._schema
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    a = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
                    r = _root(a)
                    if isinstance(r, fx.Node) and r.op == "placeholder":
                        if n.target is aten.copy_.default or n.target._schema.name.startswith("dsv4::"):
                            caches.add(r)
    return caches


def cache_copies(graph: fx.Graph) -> list[str]:
    """Every clone / copy / copy-back of a cache in ``graph``, described; empty when clean."""
    caches = cache_inputs(graph)
    bad = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _COPIES and n.args and _root(n.args[0]) in caches:
            bad.append(f"{n.format_node()}  (copies cache {_root(n.args[0]).name})")
        elif n.target is aten.copy_.default and _root(n.args[0]) in caches and _root(n.args[1]) is not _root(n.args[0]):
            bad.append(f"{n.format_node()}  (writes back into cache {_root(n.args[0]).name})")
    return bad


def host_syncs(graph: fx.Graph) -> list[str]:
    """Every node that needs the device's data on the host (``.item()``, ``nonzero``, a copy to the
    CPU, ``repeat_interleave`` without ``output_size``, any data-dependent output size such as a
    boolean-mask index), described; empty when clean."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    bad = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        name = getattr(t, "__name__", str(t))
        v = n.meta.get("val")
        if t in _SYNCS or "_local_scalar_dense" in name:
            bad.append(n.format_node())
        elif isinstance(v, torch.Tensor) and free_unbacked_symbols(v):
            bad.append(f"{n.format_node()}  (data-dependent output size {tuple(v.shape)})")
        elif t is aten.repeat_interleave.Tensor and n.kwargs.get("output_size") is None:
            bad.append(n.format_node())
        elif t in (aten._to_copy.default, prims.device_put.default):
            dev = n.kwargs.get("device") if t is aten._to_copy.default else (n.args[1] if len(n.args) > 1 else None)
            src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            if dev is not None and torch.device(dev).type == "cpu" and isinstance(src, torch.Tensor) \
                    and src.device.type != "cpu":
                bad.append(n.format_node())
    return bad


def assert_graph_ok(graph: fx.Graph) -> None:
    """Raise ``AssertionError`` listing every cache copy and host sync in ``graph``."""
    problems = cache_copies(graph) + host_syncs(graph)
    if problems:
        raise AssertionError("compiled graph violates the dsv4 rules:\n  " + "\n  ".join(problems))
