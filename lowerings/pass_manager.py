"""``DSV4PassManager``: the one Inductor ``post_grad_custom_post_pass`` of dsv4_compile.

It owns pass order and configuration, records before/after op lists for tests, and gives Inductor's
FX-graph cache a ``uuid()`` that changes whenever anything that affects the rewrite changes: the
package version, the torch minor version, the source of ``ops/`` and ``lowerings/``, and the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .graph_utils import op_list, refresh_eager_input_vals

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Which dsv4 passes run, and for which model dtypes (the dtype of the rotated activations)."""

    indexer_q: bool = True
    kv_rope_insert: bool = True
    compressor: bool = True
    inv_rope_quant: bool = True
    quant_cse: bool = True  # identical fp8_block_quant / mxfp4_quant calls ⇒ one (lowerings/quant_cse.py)
    # RMSNorm → fp8_block_quant ⇒ rms_norm_fp8_quant: off, no faster on an H200 (lowerings/norm_quant.py);
    # it runs after fp8_linear, so with both on it gets only the quants fp8_linear leaves (the q_norm
    # quant feeding q_proj goes into the GEMM)
    rms_norm_quant: bool = False
    # fp8_block_quant → fp8_block_gemm ⇒ fp8_linear (the quant inside the one-row GEMV; lowerings/fp8_linear.py)
    fp8_linear: bool = True
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")

    def __post_init__(self):
        bad = [d for d in self.dtypes if d not in _DTYPES]
        if bad:
            raise ValueError(f"PassConfig.dtypes must name {sorted(_DTYPES)}, got {bad}")

    @property
    def torch_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(_DTYPES[d] for d in self.dtypes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class Snapshot:
    """One pass-manager run on one graph: op lists before/after and matches per pass."""

    before: str
    after: str
    matches: dict[str, int]
    inplaced: int = 0  # mutations of caches sharing one storage made in place (``shared_storage``)


def _source_files() -> list[pathlib.Path]:
    import dsv4_compile.ops as ops_pkg

    here = pathlib.Path(__file__).resolve().parent
    ops_dir = pathlib.Path(ops_pkg.__file__).resolve().parent
    return sorted(here.glob("*.py")) + sorted(ops_dir.glob("*.py"))


class DSV4PassManager(CustomGraphPass):
    """Runs the enabled dsv4 fusions on Inductor's post-grad graph, then a stable topological sort,
    then makes the dsv4 mutations of caches that share one storage in place (``shared_storage``).

    Fusions are built lazily on the first graph (nothing is traced or imported before a compile).
    With ``record=True`` every run appends a ``Snapshot`` to ``self.snapshots`` (for tests).
    """

    def __init__(self, config: Optional[PassConfig] = None, record: bool = False):
        self.config = config or PassConfig()
        self.record = record
        self.snapshots: list[Snapshot] = []
        self._passes = None

    def _build(self):
        passes = []
        if self.config.indexer_q:
            from .indexer_q import IndexerQFusion

            passes.append(IndexerQFusion(self.config.torch_dtypes))
        if self.config.compressor:  # before kv_rope_insert: it owns the rope that feeds its kv_insert
            from .compressor import CompressorFusion

            passes.append(CompressorFusion())
        if self.config.kv_rope_insert:
            from .kv_insert import KvRopeInsertFusion

            passes.append(KvRopeInsertFusion(self.config.torch_dtypes))
        if self.config.inv_rope_quant:
            from .inv_rope_quant import InvRopeQuantFusion

            passes.append(InvRopeQuantFusion(self.config.torch_dtypes))
        if self.config.quant_cse:  # after the fusions above: they consume quants of their own first
            from .quant_cse import QuantCSE

            passes.append(QuantCSE())
        if self.config.fp8_linear:  # after quant_cse (a merged quant feeds several GEMMs: left alone) and
            from .fp8_linear import Fp8LinearFusion  # inv_rope_quant (its output quant is no GEMM input then)

            passes.append(Fp8LinearFusion())
        if self.config.rms_norm_quant:  # after quant_cse: a norm's duplicate quants are one by then
            from .norm_quant import RmsNormQuantFusion

            passes.append(RmsNormQuantFusion(self.config.torch_dtypes))
        return passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self._passes is None:
            self._passes = self._build()
        before = op_list(graph) if self.record else ""
        matches = {}
        for p in self._passes:
            matches[p.name] = p(graph)
        if any(matches.values()):
            from torch._inductor.pattern_matcher import stable_topological_sort

            stable_topological_sort(graph)
            graph.eliminate_dead_code()
            graph.lint()
            # a call fed by a fused op's output (other strides) keeps them: no copy to the traced layout
            refresh_eager_input_vals(graph)
        # always (caches sharing a storage are a layout, not a fusion), after the fusions: it
        # rewrites the mutations they produced
        from .shared_storage import inplace_shared_storage_mutations

        inplaced = inplace_shared_storage_mutations(graph)
        if inplaced:
            graph.lint()
        if self.record:
            self.snapshots.append(Snapshot(before, op_list(graph), matches, inplaced))

    def uuid(self) -> Optional[str]:
        """The FX-graph-cache key of this pass; ``None`` (Inductor then bypasses its caches) when
        ``record=True``: a cache hit would skip the pass, so the snapshots would stay empty."""
        if self.record:
            return None
        from dsv4_compile import __version__

        h = hashlib.sha256()
        h.update(__version__.encode())
        h.update(".".join(torch.__version__.split(".")[:2]).encode())
        h.update(get_hash_for_files(tuple(str(p) for p in _source_files())))
        h.update(self.config.to_json().encode())
        return h.hexdigest()

    def __getstate__(self):
        # Compiled artifacts may pickle the Inductor config; built passes are rebuilt on demand.
        state = dict(self.__dict__)
        state["_passes"] = None
        return state


def inductor_options(**pass_config) -> dict:
    """``options=`` for ``torch.compile``: installs a ``DSV4PassManager`` as the post-grad pass."""
    return {"post_grad_custom_post_pass": DSV4PassManager(PassConfig(**pass_config))}
