"""dsv4_compile.lowerings: the Inductor passes that rewrite plain DSv4 attention into fused ops.

Installed from the repository's top-level ``lowerings/`` folder as ``dsv4_compile.lowerings``. Only
this package imports ``torch._inductor``; import it lazily (``dsv4_compile.inductor_options`` does).
"""

import dsv4_compile  # noqa: F401  (registers torch.ops.dsv4.* before any pass looks for them)

from .graph_utils import count_ops, op_list  # noqa: F401
from .pass_manager import DSV4PassManager, PassConfig, Snapshot, inductor_options  # noqa: F401
