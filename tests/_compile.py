"""Compile helper for graph tests: the dsv4 pass manager recording before/after op lists, and the
``lowerings.checks`` rules (no cache clone / copy-back, no host sync) asserted on every final
post-grad graph the compile produced."""

import torch

from dsv4_compile.lowerings import DSV4PassManager, PassConfig
from dsv4_compile.lowerings.checks import assert_graph_ok, capture_final_graphs


def compile_checked(fn, *args, dynamic=False, **pass_kw):
    """``(fn compiled with fullgraph=True and our passes)(*args)`` → ``(output, pass manager)``."""
    pm = DSV4PassManager(PassConfig(**pass_kw), record=True)
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, options={"post_grad_custom_post_pass": pm})
    with capture_final_graphs() as graphs:
        out = compiled(*args)
    assert graphs, "nothing was compiled (an FX-graph cache hit would skip the passes)"
    for gm in graphs:
        assert_graph_ok(gm.graph)
    return out, pm
