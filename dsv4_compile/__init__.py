"""dsv4_compile: DeepSeek-V4 attention as first-class ``torch.compile`` citizens.

Importing the package registers the ``torch.ops.dsv4.*`` custom ops. The Inductor passes live in
``dsv4_compile.lowerings`` and are imported only when asked for (``inductor_options`` / ``compile``).
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers torch.ops.dsv4.*)
from ._version import __version__  # noqa: F401
from .config import DSv4AttentionConfig, YarnConfig  # noqa: F401


def inductor_options(**pass_config) -> dict:
    """``options=`` for ``torch.compile`` that install the dsv4 passes (``DSV4PassManager``).

    Keyword arguments are fields of ``dsv4_compile.lowerings.PassConfig`` (e.g.
    ``indexer_q=False`` to turn that fusion off).
    """
    from .lowerings import inductor_options as _inductor_options

    return _inductor_options(**pass_config)


def compile(fn_or_module, *, fullgraph: bool = True, options: dict | None = None, passes: dict | None = None,
            name: str | None = None, **kwargs):
    """``torch.compile`` with the dsv4 passes installed; ``fullgraph=True`` by default.

    ``passes`` configures the pass manager (``PassConfig`` fields); ``options`` are extra Inductor
    options merged over ours; other keyword arguments go to ``torch.compile`` (``dynamic=``, ...).
    ``mode=`` cannot be combined with options in ``torch.compile``: pass its settings in ``options``.

    A call whose arguments include a ``runtime.StepMetadata`` (a layer's ``forward(x, meta, cache)``,
    a step ``fn(x, meta)``) gets one graph for every token count, T = 0 and 1 included: the token dim
    of ``x`` (the first positional tensor, or the keyword ``x``) and of the metadata is marked dynamic and traced
    size-oblivious. A ``ValueError`` the function raises while it is traced reaches the caller as that
    ``ValueError`` (Dynamo reports it as a graph break otherwise). The result is a function; the
    ``torch.compile`` object is its ``.compiled``.

    Every call compiles under a code object of its own (``_own_code``), named ``name`` in Dynamo's
    logs and profiles when given. While a ``fullgraph=True`` function runs its compiled graph, the
    ops' CUDA functions skip their per-call argument checks: the ops' fakes ran them when the graph
    was traced, and Dynamo's guards hold them (``ops._lib.trusted``). Not when the call runs Python
    instead (``TORCHDYNAMO_DISABLE=1``, ``set_stance("force_eager")`` / ``"eager_on_recompile"``),
    when guards are skipped (``skip_guard_eval_unsafe``, a ``guard_filter_fn`` option), or for
    ``fullgraph=False``; a direct op call always checks everything.
    """
    import contextlib
    import functools

    import torch
    import torch.fx.experimental._config as fx_config

    from .runtime.metadata import StepMetadata

    if "mode" in kwargs:
        raise ValueError(
            "dsv4_compile.compile installs Inductor options, which torch.compile refuses together with mode=; "
            "pass the mode's settings in options= (e.g. {'triton.cudagraphs': True}) instead"
        )
    merged = inductor_options(**(passes or {}))
    merged.update(options or {})
    # fullgraph, every guard kept: each op call of the graph was traced and checked on fake tensors
    # (ops._lib.trusted); _graph_runs() excludes the ways a call runs the Python function instead.
    # (torch.compile pops guard_filter_fn from the options: look first.)
    trustable = fullgraph and "guard_filter_fn" not in merged
    compiled = torch.compile(_own_code(fn_or_module, name), fullgraph=fullgraph, options=merged, **kwargs)

    from .ops._lib import trusted

    def trust():
        return trusted() if trustable and _graph_runs() else contextlib.nullcontext()

    def run(*args, **kw):
        metas = [a for a in list(args) + list(kw.values()) if isinstance(a, StepMetadata)]
        try:
            if not metas:
                with trust():
                    return compiled(*args, **kw)
            x = next((a for a in args if isinstance(a, torch.Tensor)), kw.get("x"))
            for t in ([x] if x is not None else []) + [t for m in metas for t in m.token_tensors()]:
                torch._dynamo.mark_dynamic(t, 0)
            # set and restored by hand: fx_config.patch(...) costs ~15 µs of host time per step
            old = fx_config.backed_size_oblivious
            fx_config.backed_size_oblivious = True
            try:
                with trust():
                    return compiled(*args, **kw)
            finally:
                fx_config.backed_size_oblivious = old
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.TorchRuntimeError) as e:
            err = _traced_value_error(e)
            if err is None:
                raise
            raise err from None

    target = fn_or_module.forward if isinstance(fn_or_module, torch.nn.Module) else fn_or_module
    if hasattr(target, "__name__"):
        functools.update_wrapper(run, target)
    run.compiled = compiled
    return run


def _graph_runs() -> bool:
    """Whether calling a ``fullgraph=True`` compiled function now runs a compiled graph with its guards
    evaluated, rather than the Python function: Dynamo enabled (not ``TORCHDYNAMO_DISABLE=1``) and
    the default stance (``torch.compiler.set_stance``: ``force_eager`` and ``eager_on_recompile`` run
    Python, ``skip_guard_eval_unsafe`` skips the guards the ops' checks rely on)."""
    import torch._dynamo

    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return (not torch._dynamo.config.disable and stance is not None and stance.stance == "default"
            and not stance.skip_guard_eval_unsafe)


_COMPILE_IDS = __import__("itertools").count()


def fresh_function(fn, name: str):
    """A copy of the plain function ``fn`` with a code object of its own, named ``name`` in logs and
    profiles. Dynamo keeps compiled graphs, recompile counts and automatic-dynamic state per code
    object, so each copy starts with its own."""
    import types

    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python >= 3.11
        code = code.replace(co_qualname=name)
    new = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__doc__, new.__module__ = fn.__kwdefaults__, fn.__doc__, fn.__module__
    return new


def _own_code(fn, name=None):
    """``fn`` (a function, a module or any callable) under a code object new to this compile: a
    copy of a plain function (``fresh_function``), else a trampoline that calls ``fn`` (inlined).

    Dynamo keeps compiled graphs per code object and recompiles one up to its recompile limit (8):
    every ``compile`` call builds a new backend, and a step written as a closure
    (``lambda x, meta: layer(x, meta, cache)``, one per layer) shares its code object with every
    other such step, as layers compiled as modules share ``DeepseekV4Attention.forward``. Compiled
    through one code object, the ninth layer would fail with ``FailOnRecompileLimitHit``
    (``BACKEND_MATCH`` and the closure's guards fail for each new one). Its own code object gives
    each ``compile`` call a cache of its own. (With ``fullgraph=False``, a graph break makes Dynamo
    compile the frames below it on their own code objects, which layers share again: use
    ``fullgraph=True``, the default, or ``model.compile_layer``, for many layers.)"""
    import types

    name = name or f"{getattr(fn, '__name__', type(fn).__name__)}_dsv4_compile_{next(_COMPILE_IDS)}"
    if isinstance(fn, types.FunctionType):
        return fresh_function(fn, name)

    def step(*args, **kwargs):
        return fn(*args, **kwargs)

    return fresh_function(step, name)


def _traced_value_error(e) -> "ValueError | None":
    """The ``ValueError`` raised while Dynamo traced, or ``None``: an op's check on fake tensors comes
    wrapped in ``TorchRuntimeError`` (its cause is the error itself); a ``raise`` in user code comes
    as ``Unsupported`` ("Observed exception"), naming the arguments in its text: their repr (torch 2.13:
    ``raised exception ValueError('msg')``) or Dynamo's variables (torch 2.11:
    ``raised exception ValueError([ConstantVariable(str: 'msg')])``)."""
    import ast
    import re

    seen, cur = set(), e.__cause__ or e.__context__
    while cur is not None and id(cur) not in seen:  # an op's own check, raised on fake tensors
        if isinstance(cur, ValueError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    texts = [str(a) for a in getattr(e.__cause__, "args", ())] + [str(e)]
    for pattern in (r"raised exception ValueError\(\[ConstantVariable\(str: (.*)\)\]\)",
                    r"raised exception ValueError\((.*)\)"):
        for text in texts:
            for line in text.splitlines():
                m = re.search(pattern, line)
                if m is None:
                    continue
                try:
                    return ValueError(*ast.literal_eval(f"({m.group(1)},)")) if m.group(1) else ValueError()
                except (ValueError, SyntaxError):
                    continue
    return None
