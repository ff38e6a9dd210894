"""Tensor parallelism for DSv4 attention over a ``torch.distributed`` process group.

Each of the ``tp`` ranks holds ``H / tp`` query heads: ``wq_b``'s rows, ``attn_sink`` and whole
output groups of ``wo_a`` / ``wo_b`` (a full checkpoint is sliced on load, as for any head shard of
``DeepseekV4Attention``). The rest of the layer — ``wq_a``, the single K=V head, the compressors,
the indexer, the caches — is replicated: every rank computes it, bit for bit the same. ``wo_b`` is
row-parallel, so each rank's output is a partial sum over its output groups, and the layer ends with
**one** all-reduce (sum) of ``wo_b``'s output ``[T, hidden]`` in the activation dtype (bf16).

The all-reduce is the *functional* collective ``torch.distributed._functional_collectives.all_reduce``
followed by ``wait_tensor``: Dynamo traces it into the graph (``_c10d_functional.all_reduce`` +
``wait_tensor``; Inductor runs it in place on the GEMM's output buffer), so a compiled step is
still one ``fullgraph`` graph and, with NCCL, the collective is captured in the runner's CUDA graph.
On CPU it runs over gloo (bf16 sums included, torch 2.13).

Launch with ``torchrun --nproc_per_node <tp>``; every rank builds the same layers (same config, same
arguments, the same full checkpoint) and runs the same steps: a step is a collective.

``ValueError`` on **every** rank (never an error on one rank and a hang on the others) for a ``tp``
that does not split the heads into whole output groups, for explicit ``n_local_heads`` /
``head_offset`` that are not this rank's shard, and for ranks that build a layer with different
configs or arguments: the layer's constructor exchanges a description of its arguments and its local
error with every rank (one ``all_gather_object``, outside any compiled code) before it raises.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.distributed as dist

if dist.is_available():
    from torch.distributed import _functional_collectives as funcol

from .config import DSv4AttentionConfig


class TensorParallel:
    """A tensor-parallel group: ``group`` (a ``torch.distributed`` process group, default WORLD),
    ``rank`` (this process's rank in it), ``world_size`` (the TP degree), ``group_name`` (what the
    functional collectives take) and ``backend`` ("gloo", "nccl").

    ``ValueError`` when ``torch.distributed`` is not initialized or this process is not in ``group``.
    Shared, never copied: a deep copy of a module keeps the same group."""

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("TensorParallel needs an initialized torch.distributed process group: launch with "
                             "torchrun and call torch.distributed.init_process_group('nccl' or 'gloo') first")
        group = dist.group.WORLD if group is None else group
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group")
        self.group, self.rank, self.world_size = group, rank, dist.get_world_size(group)
        self.group_name = group.group_name
        self.backend = str(dist.get_backend(group))

    def __repr__(self) -> str:
        return (f"TensorParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"group_name={self.group_name!r})")

    def __deepcopy__(self, memo):
        return self  # a description of a process group, not state: copies of a layer share it

    # --- inside the forward (traced) ----------------------------------------------------------
    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Sum of ``y`` over the group, in ``y``'s dtype (``y`` itself when ``world_size == 1``).

        The functional collective ``funcol.all_reduce``: traced, it is an
        ``_c10d_functional.all_reduce`` node followed by its ``wait_tensor``; in eager mode it returns
        an ``AsyncCollectiveTensor``, waited here so that callers get a plain tensor."""
        if self.world_size == 1:
            return y
        y = funcol.all_reduce(y, "sum", self.group_name)
        return y if torch.compiler.is_compiling() else funcol.wait_tensor(y)

    # --- construction-time checks (host, collective, never inside compiled code) -------------
    def agree(self, what: str, key: dict, error: Optional[str] = None) -> None:
        """Check that every rank passes the same ``key`` (a dict of named values, compared by
        ``repr``) and that no rank has a local ``error``; else raise one ``ValueError`` on every
        rank, naming the ranks and the values that differ and each rank's error.

        A collective (one ``all_gather_object`` over the group): every rank must call it, the same
        number of times. With NCCL the current CUDA device must be this rank's
        (``torch.cuda.set_device``), as for any object collective."""
        mine = {name: repr(value) for name, value in key.items()}
        if self.world_size == 1:
            gathered = [(mine, error)]
        else:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, (mine, error), group=self.group)
        problems = []
        names = sorted({n for keys, _ in gathered for n in keys})
        differ = [n for n in names if len({keys.get(n) for keys, _ in gathered}) > 1]
        for n in differ:
            values = ", ".join(f"rank {r}: {_short(keys.get(n, '<missing>'))}" for r, (keys, _) in enumerate(gathered))
            problems.append(f"{n} differs across ranks ({values})")
        errors = [err for _, err in gathered]
        if any(e is not None for e in errors) and len(set(errors)) == 1:
            problems.append(f"every rank: {errors[0]}")
        else:
            problems += [f"rank {r}: {err}" for r, err in enumerate(errors) if err is not None]
        if problems:
            raise ValueError(f"{what} over {self.world_size} tensor-parallel ranks (rank {self.rank} of group "
                             f"{self.group_name!r}): " + "; ".join(problems))


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def head_shard(config: DSv4AttentionConfig, tp: Union[TensorParallel, int], rank: Optional[int] = None
               ) -> tuple[int, int]:
    """``(n_local_heads, head_offset)`` of ``rank``'s query heads when ``tp`` ranks split the
    ``num_attention_heads`` heads evenly (``tp`` a ``TensorParallel`` — its rank by default — or the
    TP degree as an int, rank 0 by default).

    ``ValueError`` unless every rank gets the same number of heads and they form whole output groups
    (``config.heads_per_group`` heads share one ``wo_a`` group): that is, unless ``tp`` divides
    ``o_groups``."""
    size = tp.world_size if isinstance(tp, TensorParallel) else tp
    if rank is None:
        rank = tp.rank if isinstance(tp, TensorParallel) else 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"the tensor-parallel degree must be a positive int, got {size!r}")
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    h, hpg, groups = config.num_attention_heads, config.heads_per_group, config.o_groups
    valid = [d for d in range(1, groups + 1) if groups % d == 0]
    if h % size:
        raise ValueError(f"tensor parallelism over {size} ranks needs num_attention_heads ({h}) divisible by {size}; "
                         f"this config allows tp in {valid}")
    local = h // size
    if local % hpg:
        raise ValueError(f"tensor parallelism over {size} ranks would give each rank {local} heads, not a whole "
                         f"number of output groups ({hpg} heads per group, o_groups={groups}): a group's heads "
                         f"share one wo_a block and must stay on one rank; this config allows tp in {valid}")
    return local, rank * local


def layer_shard(tp: TensorParallel, config: DSv4AttentionConfig, n_local_heads: Optional[int],
                head_offset: Optional[int], **settings) -> tuple[int, int]:
    """``DeepseekV4Attention``'s constructor with ``tp``: this rank's ``(n_local_heads, head_offset)``
    (``head_shard``), after every rank agreed (``TensorParallel.agree``) on the config, the TP degree,
    the layer's other ``settings`` and ``n_local_heads``, and every rank's explicit values matched its
    shard. ``ValueError`` on every rank otherwise."""
    if not isinstance(tp, TensorParallel):
        raise ValueError(f"tp must be a dsv4_compile.distributed.TensorParallel, got {type(tp).__name__}")
    key = {"tp": tp.world_size, "n_local_heads": n_local_heads, **settings}
    if dataclasses.is_dataclass(config):
        key.update({f"config.{f.name}": getattr(config, f.name) for f in dataclasses.fields(config)})
    else:
        key["config"] = config
    error, shard = None, None
    try:
        shard = head_shard(config, tp)
        given = (n_local_heads, head_offset)
        if (n_local_heads is not None and n_local_heads != shard[0]) or (
                head_offset is not None and head_offset != shard[1]):
            raise ValueError(f"n_local_heads={given[0]}, head_offset={given[1]} are not rank {tp.rank}'s shard "
                             f"(n_local_heads={shard[0]}, head_offset={shard[1]}): leave them out with tp, "
                             f"they follow from it")
    except Exception as e:  # noqa: BLE001  (any local failure: raised on every rank below, never a hang)
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    tp.agree("DeepseekV4Attention", key, error)
    return shard
