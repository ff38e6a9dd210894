"""Pre-bound launches of the dsv4 Triton kernels: ``kernel[grid](*args, **meta)`` with Triton's per-call
Python work done once per specialization instead of on every call.

On every launch Triton's ``JITFunction.run`` re-binds the arguments to the signature, specializes each
of them (in C++), builds and looks up a string cache key, re-reads its knobs, checks the globals the
kernel captured, canonicalizes the grid and builds the launch metadata its hooks would see, and only
then calls the compiled kernel's launcher. ``prebound`` wraps a ``triton.jit`` kernel so that a call
whose arguments specialize as an earlier call's did goes straight to that launcher
(``CompiledKernel.run``: the same C launcher, scratch allocation and stream Triton uses).

The key is what Triton specializes on, computed from the arguments: per tensor its dtype and whether
its address is 16-byte aligned; per int whether it is 1 (a constexpr then), a multiple of 16, and its
range (int32 / int64 / uint64); bools, floats and ``None`` by kind; the keyword arguments (the
constexprs and launch options such as ``num_warps``) by type and value; the knobs Triton reads on
every call (debug, instrumentation mode, FP sanitizer); the current CUDA device. A call the key
cannot describe takes Triton's own path every time: a constexpr passed positionally, a non-constexpr
argument passed by keyword, an argument of another type, a callable grid, a launch hook installed
(``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``, e.g. a profiler), a pre-run or
stages-inspection hook, the interpreter (``TRITON_INTERPRET=1``), or ``DSV4_TRITON_LAUNCH=triton`` in
the environment at import. Skipped on the pre-bound path: Triton's check that the globals a kernel
captured are unchanged (the kernels here capture only constants).

Programmatic dependent launch (PDL): on sm_90+ every launch of a kernel that declares the ``PDL``
constexpr (the package's kernels: they start with ``_common.pdl_enter``, a grid-dependency wait, then
the trigger that lets the next kernel launch) adds ``PDL=True`` and Triton's ``launch_pdl=True``
option, so under CUDA-graph replay the next kernel's launch and CTA setup overlap the running one;
``DSV4_PDL=0`` in the environment at import turns it off (also on Triton's path: the same two
keywords decide it).
"""

from __future__ import annotations

import os

import torch

from ._common import interpreting

ENV = "DSV4_TRITON_LAUNCH"  # "triton": every launch through Triton's JITFunction.run
PDL_ENV = "DSV4_PDL"  # "0": launch without programmatic dependent launch
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl",
                      "launch_cooperative_grid"})
_I32 = (-(2**31), 2**31)
_I64 = 2**63


try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: no pre-bound launches
    _knobs = None

ENABLED = _knobs is not None and not interpreting() and os.environ.get(ENV, "").strip().lower() != "triton"
PDL = not interpreting() and os.environ.get(PDL_ENV, "").strip() != "0"
_PDL_META = {"PDL": True, "launch_pdl": True}
_pdl_devices: dict = {}


def pdl_meta(device: int) -> dict | None:
    """The keywords that launch a kernel with PDL on CUDA device ``device``, or None (PDL off, or
    below sm_90)."""
    ok = _pdl_devices.get(device)
    if ok is None:
        ok = _pdl_devices[device] = PDL and torch.cuda.get_device_capability(device)[0] >= 9
    return _PDL_META if ok else None


def _hooks_installed() -> bool:
    """Whether Triton would call a launch hook (then every launch takes its path, which feeds them)."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _knob_state(fn):
    """The settings ``JITFunction.run`` reads on every call that change the compiled kernel (debug,
    instrumentation, FP sanitizer), or None while a stages-inspection hook is installed (it adds to
    Triton's key what ours cannot see)."""
    rt, comp = _knobs.runtime, _knobs.compilation
    if getattr(rt, "add_stages_inspection_hook", None) is not None:
        return None
    return (getattr(fn, "debug", None), rt.debug, getattr(comp, "instrumentation_mode", None),
            getattr(comp, "fpsan_homomorphic_casts", None))


def _arg_key(a):
    """What Triton's specialization sees of one positional (non-constexpr) argument."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    t = type(a)
    if t is int:
        return 1 if a == 1 else 16 if a & 15 == 0 else 0, 0 if _I32[0] <= a < _I32[1] else 1 if a < _I64 else 2
    if t is bool:
        return "b"
    if t is float:
        return "f"
    if a is None:
        return None
    raise TypeError(type(a).__name__)


class _Bound:
    """One compiled specialization: the launcher and everything its call needs but the arguments."""

    __slots__ = ("run", "function", "packed", "tail", "kernel")

    def __init__(self, kernel, tail: tuple):
        self.kernel = kernel  # keeps the module (and its CUfunction) alive
        self.run = kernel.run  # loads the module on the current device on first access
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.tail = tail  # the parameters after the positional ones, constexprs included, in order


class PreBound:
    """A ``triton.jit`` kernel launched as ``kernel[grid](*args, **meta)``; see the module docstring.
    ``.jit_fn`` is the wrapped kernel (for ``triton.compile`` / ``ASTSource``; its other attributes
    read through: ``arg_names``, ``params``, ...); ``.launches`` counts
    the launches that took Triton's path (compiles and fallbacks), ``.fast`` the pre-bound ones."""

    def __init__(self, fn):
        self.jit_fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        params = getattr(fn, "params", None)  # None under the interpreter
        self._params = list(params) if params is not None else []
        self._constexpr = {p.name: p.is_constexpr for p in self._params}
        self._first_constexpr = next((i for i, p in enumerate(self._params) if p.is_constexpr), len(self._params))
        self._pdl = self._constexpr.get("PDL", False)  # the kernel takes the PDL constexpr (pdl_enter)
        self._cache: dict = {}
        self.launches = 0
        self.fast = 0

    def __getitem__(self, grid):
        return lambda *args, **meta: self._launch(grid, args, meta)

    def __getattr__(self, name):  # arg_names, params, src, ...: the wrapped kernel's
        if name == "jit_fn":
            raise AttributeError(name)
        return getattr(self.jit_fn, name)

    def _key(self, device, grid, args, meta):
        """The specialization key of a call on CUDA device ``device``, or None when it cannot have one."""
        if (not ENABLED or len(args) > self._first_constexpr or callable(grid)
                or getattr(self.jit_fn, "pre_run_hooks", None)):
            return None
        knobs = _knob_state(self.jit_fn)
        if knobs is None:
            return None
        try:
            # keyword values by type too: True == 1 == 1.0 as dict keys, not to Triton
            return (device, tuple(map(_arg_key, args)),
                    tuple((k, v.__class__, repr(v) if v.__class__ is float else v) for k, v in meta.items()), knobs)
        except TypeError:  # an argument the key cannot describe
            return None

    def _launch(self, grid, args, meta):
        pdl_kernel = PDL and self._pdl
        # one device query per launch, none where neither needs it (the interpreter: no CUDA)
        device = torch.cuda.current_device() if ENABLED or pdl_kernel else None
        if pdl_kernel and "PDL" not in meta:
            pdl = pdl_meta(device)
            if pdl is not None:
                meta = {**meta, **pdl}
        key = self._key(device, grid, args, meta)
        try:
            bound = self._cache.get(key) if key is not None else None
        except TypeError:  # an unhashable keyword value
            key = bound = None
        if bound is not None and not _hooks_installed():
            n = len(grid)
            bound.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                      torch._C._cuda_getCurrentRawStream(key[0]), bound.function, bound.packed, None, None, None,
                      *args, *bound.tail)
            self.fast += 1
            return bound.kernel
        self.launches += 1
        kernel = self.jit_fn[grid](*args, **meta)
        if key is not None and bound is None:
            bound = self._bind(kernel, len(args), meta)
            if bound is not None:
                self._cache[key] = bound
        return kernel

    def _bind(self, kernel, n_args: int, meta):
        """The ``_Bound`` of a kernel Triton just compiled and launched, or None when it is not one
        (a veto of the compile) or a keyword is neither a constexpr parameter nor a launch option."""
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return None
        if any(not self._constexpr.get(k, k in _OPTIONS) for k in meta):
            return None
        tail = []
        for p in self._params[n_args:]:
            if p.name in meta:
                tail.append(meta[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        kernel = kernel.result() if hasattr(kernel, "result") else kernel  # an asynchronous compile
        return _Bound(kernel, tuple(tail))


def prebound(fn) -> PreBound:
    """Decorator (above ``@triton.jit``): launch the kernel through ``PreBound``."""
    return PreBound(fn)
