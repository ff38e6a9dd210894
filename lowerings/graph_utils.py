"""FX helpers shared by the dsv4 passes: op lists for tests, argument access, fake metadata."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2


def op_name(target) -> str:
    """``dsv4.rope.default`` / ``aten.mul.Tensor`` / ``prims.convert_element_type.default``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def op_list(graph: fx.Graph) -> str:
    """One line per ``call_function`` node (getitems left out), in graph order; mutating custom ops
    appear as ``af2(dsv4.kv_insert)`` / ``af1(...)`` around their functionalized wrapper."""
    lines = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        if n.target is auto_functionalized_v2:
            lines.append(f"af2({op_name(n.args[0])})")
        elif n.target is auto_functionalized:
            lines.append(f"af1({op_name(n.args[0])})")
        else:
            lines.append(op_name(n.target))
    return "\n".join(lines)


def count_ops(graph: fx.Graph, target) -> int:
    """Calls of ``target`` (an OpOverload or its packet, as Dynamo graphs record it), including
    inside auto_functionalized wrappers."""
    def same(t) -> bool:
        return t is target or getattr(t, "overloadpacket", None) is target or (
            isinstance(t, torch._ops.OpOverloadPacket) and getattr(target, "overloadpacket", None) is t
        )

    n_calls = 0
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if same(n.target) or (n.target in (auto_functionalized, auto_functionalized_v2) and same(n.args[0])):
            n_calls += 1
    return n_calls


def bound_args(node: fx.Node) -> dict[str, Any]:
    """A custom-op node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def val(node) -> Optional[torch.Tensor]:
    """The fake tensor recorded for a node (``meta['val']``), or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def getitem_users(node: fx.Node) -> Optional[dict[int, fx.Node]]:
    """``{index: getitem node}`` if every user of a multi-output node is a distinct getitem."""
    out = {}
    for u in node.users:
        if u.target is not operator.getitem or u.args[1] in out:
            return None
        out[u.args[1]] = u
    return out


def call_with_outputs(graph: fx.Graph, target, args: tuple, ref_nodes: list[fx.Node]):
    """A call of the multi-output op ``target`` at the graph's insertion point and one getitem per
    output right after it, each with its fake value: ``(call, [getitem, ...])``."""
    call = graph.call_function(target, args)
    call.meta["val"] = fake_call(target, args, ref_nodes)
    outs = []
    with graph.inserting_after(call):
        for i in reversed(range(len(call.meta["val"]))):  # each goes right after the call
            g = graph.call_function(operator.getitem, (call, i))
            g.meta["val"] = call.meta["val"][i]
            outs.append(g)
    return call, outs[::-1]


def fake_call(target, args: tuple, ref_nodes: list[fx.Node]):
    """Run ``target`` on the fake values of ``args`` (nodes replaced by their meta['val'])."""
    from torch._guards import detect_fake_mode

    vals = [val(n) for n in ref_nodes if val(n) is not None]
    mode = detect_fake_mode(vals)
    real_args = tuple(val(a) if isinstance(a, fx.Node) else a for a in args)
    with mode:
        return target(*real_args)


def same_sizes(a, b) -> bool:
    """Whether two (possibly symbolic) size tuples are statically known to be equal (no guards)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(x is y or statically_known_true(x == y) for x, y in zip(a, b))


def functionalized_nodes(graph: fx.Graph, op) -> list[fx.Node]:
    """The ``auto_functionalized_v2`` nodes that call ``op`` (a list: safe to rewrite while iterating)."""
    return [n for n in graph.find_nodes(op="call_function", target=auto_functionalized_v2) if n.args[0] is op]


def base_getitems(node: fx.Node) -> dict[int, fx.Node]:
    """``{index: getitem}`` of an ``auto_functionalized_v2`` node's outputs."""
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def single_user_call(node, target) -> bool:
    """``node`` is a call of ``target`` whose only user is the node being matched."""
    return isinstance(node, fx.Node) and node.target is target and len(node.users) == 1


def fp32_of(node) -> Optional[fx.Node]:
    """X for ``X.float()`` (``convert_element_type`` / ``_to_copy`` to fp32 and nothing else), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.target is torch.ops.prims.convert_element_type.default and node.args[1] == torch.float32:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if (node.target is torch.ops.aten._to_copy.default and node.kwargs.get("dtype") == torch.float32
            and set(node.kwargs) <= {"dtype"}):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def refresh_eager_input_vals(graph: fx.Graph) -> None:
    """Point the recorded eager inputs of every ``dsv4`` op call at its current inputs.

    Inductor lays out a custom op's inputs with the strides they had when the graph was traced
    (``node.meta["eager_input_vals"]``, its ``needs_exact_strides`` default). When a pass gives an
    existing call a new producer with other strides (the output-path fusion's group-major FP8 ``o``
    feeding the grouped ``wo_a`` GEMM), that record would make Inductor copy the new input back into
    the old layout before the call. Every ``dsv4`` op gives the same results for any input strides
    (its contract), so the current inputs' strides are as good, and no copy is needed."""
    for n in graph.nodes:
        if (n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload)
                or n.target.namespace != "dsv4" or "eager_input_vals" not in n.meta):
            continue
        if any(val(a) is None for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)):
            continue
        n.meta["eager_input_vals"] = (tuple(val(a) if isinstance(a, fx.Node) else a for a in n.args),
                                      {k: val(v) if isinstance(v, fx.Node) else v for k, v in n.kwargs.items()})
