"""Shared plumbing of the dsv4 ops: the namespace and input validation.

Validation raises ``ValueError`` naming the argument and what was expected. Checks that need
tensor *values* (positions, slots, indices and block-table entries in range) run only where they cost
no device sync: on CPU tensors. Setting the environment variable ``DSV4_CHECK_INDICES=1`` runs them on
every device (one host sync per checked tensor: a debugging aid, not for CUDA-graph capture). With it
off, the GPU kernels mask out-of-range slots, indices and block-table entries (never a byte outside a
cache is read or written), and a position outside the RoPE table gives NaN rotated dims
(docs/numerics.md §9.4).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterable, Optional

import torch

NAMESPACE = "dsv4"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TABLE_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


DEBUG_ENV = "DSV4_CHECK_INDICES"


def _env_flag(name: str) -> bool:
    """An on/off environment switch: set and not one of "", 0, false, no, off."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def debug_checks() -> bool:
    """Whether ``DSV4_CHECK_INDICES`` asks for host-side index checks on every device (read per call)."""
    return _env_flag(DEBUG_ENV)


def host_checked(t: torch.Tensor) -> bool:
    """Whether value checks run on ``t``: a real, non-empty tensor on the CPU (free) or on any device
    under ``DSV4_CHECK_INDICES=1`` (a sync)."""
    # cheapest test first: on a GPU (the hot path) this is one device-type compare and one environ read
    return (t.device.type == "cpu" or debug_checks()) and t.numel() > 0 and not _is_fake(t)


_TRUST = threading.local()  # .depth > 0 while a fullgraph compiled function runs (trusted())


@contextlib.contextmanager
def trusted():
    """Inside: the ops' CUDA functions skip their argument checks (``checks_needed()`` is False).

    ``dsv4_compile.compile`` enters it around each call of a ``fullgraph=True`` compiled function
    that will run its graph with its guards (``dsv4_compile._graph_runs``). Every op call such a
    graph makes was traced: its fake ran the same checks on the traced arguments, and the guards
    Dynamo installed (dtypes, devices, ranks, strides, the shape relations the checks compared) must
    hold for the graph to run, so a second check per call would only cost host time (3–20 µs per
    op). What the guards do not hold, a cache's storage offset, is checked on every call
    (``check_cache_offset``, ``check_state_offset``). Value checks under ``DSV4_CHECK_INDICES=1``
    still run; a direct call of an op outside a compiled graph checks everything. Per thread; nests."""
    _TRUST.depth = getattr(_TRUST, "depth", 0) + 1
    try:
        yield
    finally:
        _TRUST.depth -= 1


def checks_needed() -> bool:
    """Whether an op's CUDA function validates its arguments: outside ``trusted()``, or under
    ``DSV4_CHECK_INDICES=1``."""
    return not getattr(_TRUST, "depth", 0) or debug_checks()


def check_range(name: str, t: torch.Tensor, lo: int, hi: Optional[int], what: str) -> None:
    """``lo <= t < hi`` (``hi=None``: no upper bound) for every value of ``t`` where
    ``host_checked(t)``; ``what`` explains the bounds."""
    if not host_checked(t):
        return
    tmin, tmax = int(t.min()), int(t.max())
    if tmin < lo or (hi is not None and tmax >= hi):
        bounds = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must lie in {bounds} ({what}), got [{tmin}, {tmax}]")


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


FULL_DISPATCH_ENV = "DSV4_FULL_DISPATCH"


def _full_dispatch() -> bool:
    """Whether ``DSV4_FULL_DISPATCH=1`` keeps ``custom_op``'s Python dispatch layers (read at import)."""
    return _env_flag(FULL_DISPATCH_ENV)


_DIRECT = None  # the Library that holds the direct registrations (created on first use)


def register_direct(op, kernels: dict) -> None:
    """Register ``op``'s device functions straight on the dispatcher and skip the layers an inference
    op does not need.

    ``torch.library.custom_op`` still declares every op (schema, fake, ``register_kernel``, opcheck),
    but it puts three Python layers in front of each call: an ``Autograd`` kernel, for mutating ops an
    ``ADInplaceOrView`` kernel that bumps the mutated tensors' version counters, and a backend wrapper
    (an aliasing check of the outputs and ``torch._disable_dynamo``). Together they cost 15–35 µs per
    call on the H200 machine's host (``benchmarks/host_dispatch.py``). Here ``kernels`` (dispatch key
    → function, e.g. ``{"CUDA": ..., "CPU": ...}``) are registered on their keys directly (still under
    ``torch._disable_dynamo``), and ``Autograd`` and ``ADInplaceOrView`` become C++ fallthroughs.

    What changes for a caller:
    * outputs of an op called on inputs that require grad do not require grad (the ops have no
      backward either way: ``custom_op``'s layer only deferred the error to ``backward()``);
    * an op's in-place write does not bump the cache's version counter, fake tensors' included (nothing
      autograd saved can alias a cache; Dynamo's checks for mutation inside higher-order ops such as
      ``torch.cond`` then fail later, in functionalization, instead of with their own message);
    * ``custom_op``'s own per-device machinery is bypassed: ``op.set_kernel_enabled`` and a later
      ``op.register_kernel`` have no effect, and eager calls skip its output-aliasing check (opcheck
      in the tests still checks that outputs are fresh).
    ``DSV4_FULL_DISPATCH=1`` at import keeps ``custom_op``'s layers.
    """
    global _DIRECT
    if _full_dispatch():
        return
    from torch.library import Library, fallthrough_kernel

    if _DIRECT is None:
        _DIRECT = Library(NAMESPACE, "FRAGMENT")
    regs = [(fallthrough_kernel, "Autograd")]
    if op._opoverload._schema.is_mutable:
        regs.append((fallthrough_kernel, "ADInplaceOrView"))
    regs += [(torch._disable_dynamo(_without_grad(fn)), key) for key, fn in kernels.items()]
    for fn, key in regs:  # custom_op registered these keys already: ours replace its kernels
        _DIRECT.impl(op._name, fn, key, allow_override=True)


def _without_grad(fn):
    """``fn`` run with grad mode off (as ``custom_op``'s Autograd layer ran it): outputs never carry a
    ``grad_fn``, whatever torch ops compute them, also for inputs that require grad."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


CUDA_KERNELS: dict[str, Callable] = {}
"""The CUDA implementation of every op by short name, as registered (argument normalization
included): tests call them on CPU tensors under ``TRITON_INTERPRET=1``."""


def register_cuda(op, *, strided: tuple[str, ...] = ()):
    """Decorator: register ``fn`` as ``op``'s CUDA kernel, with its inputs' strides normalized.

    Every tensor argument that ``op`` does not mutate reaches ``fn`` contiguous (``.contiguous()``:
    free when it already is, one small copy when a caller hands a column of a token-major buffer),
    except the arguments named in ``strided``, whose launchers pass every stride to the kernel.
    Mutated arguments (the caches) are written in place, so they reach ``fn`` as given; their
    kernels take the page stride, and ``check_cache`` requires contiguous pages. So no launcher can
    read an argument as if it were contiguous when it is not, whatever strides the caller used.
    """
    schema = op._opoverload._schema
    names = [a.name for a in schema.arguments]
    unknown = set(strided) - set(names)
    if unknown:
        raise ValueError(f"{op._qualname} has no arguments {sorted(unknown)}")
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    copied_caches = [n for n in names if n.endswith("cache") and n != "cos_sin_cache" and n not in mutated | set(strided)]
    if copied_caches:  # a paged cache read through .contiguous() would be copied whole on every call
        raise ValueError(f"{op._qualname}: list the paged caches {copied_caches} in strided= (kernels take the page stride)")
    normalize = [(i, n) for i, n in enumerate(names) if n not in mutated and n not in strided]

    def contiguous(t):
        return t.contiguous() if isinstance(t, torch.Tensor) and not t.is_contiguous() else t

    def deco(fn):
        def kernel(*args, **kwargs):
            args = list(args)
            for i, name in normalize:
                if i < len(args):
                    args[i] = contiguous(args[i])
                elif name in kwargs:
                    kwargs[name] = contiguous(kwargs[name])
            return fn(*args, **kwargs)

        kernel.__name__, kernel.__doc__, kernel.__wrapped__ = fn.__name__, fn.__doc__, fn
        op.register_kernel("cuda")(kernel)
        register_direct(op, {"CUDA": kernel, "CPU": op._init_fn})
        CUDA_KERNELS[op._name] = kernel
        return kernel

    return deco


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must be one of ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_rope_args(x_name: str, x, positions, cos_sin_cache) -> None:
    """The shared contract of every op that rotates ``x [T, ..., D]`` at ``positions [T]``."""
    check_tensor(x_name, x, min_ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=x.device)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=TABLE_DTYPES, device=x.device)
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries but {x_name} has {x.shape[0]} tokens")
    rot = cos_sin_cache.shape[-1]
    if rot == 0 or rot % 2:
        raise ValueError(f"cos_sin_cache's rope dim must be even and positive, got {rot}")
    if rot > x.shape[-1]:
        raise ValueError(f"cos_sin_cache's rope dim {rot} exceeds {x_name}'s last dim {x.shape[-1]}")
    check_range("positions", positions, 0, cos_sin_cache.shape[0], "the cos_sin_cache rows")


def check_positive_int(name: str, value) -> None:
    """A positive Python int (a SymInt when Dynamo traces an int under ``dynamic=True``; the kernels
    get the real int)."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_block_table(block_table, token_to_req, n_tokens: int, tokens_name: str, device) -> None:
    """``block_table [R, M]`` int32 and ``token_to_req [n_tokens]`` (negative = padding token); on CPU
    also every request index below R (free there, a sync on the GPU)."""
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("token_to_req", token_to_req, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if token_to_req.shape[0] != n_tokens:
        raise ValueError(f"token_to_req has {token_to_req.shape[0]} entries but {tokens_name} has {n_tokens} tokens")
    _check_below("token_to_req", token_to_req, block_table.shape[0], "the block_table rows", "padding")


def check_block_entries(block_table, num_blocks: int, cache_name: str) -> None:
    """Every allocated entry of ``block_table`` (negative = unallocated) names a page of the cache."""
    _check_below("block_table entries", block_table, num_blocks, f"the pages of {cache_name}", "unallocated")


def _check_below(name: str, t: torch.Tensor, hi: int, what: str, negative: str) -> None:
    """Every value of ``t`` below ``hi`` or negative (which means ``negative``), where ``host_checked(t)``."""
    if host_checked(t):
        top = int(t.max())
        if top >= hi:
            raise ValueError(f"{name} must be < {hi} ({what}) or negative ({negative}), got {top}")


def check_power_of_two(name: str, value: int, lo: int = 1, hi: int = 1 << 30) -> None:
    if value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value}")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
