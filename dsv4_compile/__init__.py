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


def compile(fn_or_module, *, fullgraph: bool = True, options: dict | None = None, passes: dict | None = None, **kwargs):
    """``torch.compile`` with the dsv4 passes installed; ``fullgraph=True`` by default.

    ``passes`` configures the pass manager (``PassConfig`` fields); ``options`` are extra Inductor
    options merged over ours; other keyword arguments go to ``torch.compile`` (``dynamic=``, ...).
    ``mode=`` cannot be combined with options in ``torch.compile``: pass its settings in ``options``.
    """
    import torch

    if "mode" in kwargs:
        raise ValueError(
            "dsv4_compile.compile installs Inductor options, which torch.compile refuses together with mode=; "
            "pass the mode's settings in options= (e.g. {'triton.cudagraphs': True}) instead"
        )
    merged = inductor_options(**(passes or {}))
    merged.update(options or {})
    return torch.compile(fn_or_module, fullgraph=fullgraph, options=merged, **kwargs)
