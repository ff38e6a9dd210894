"""``DeepseekV4AttentionStack``: every attention layer of a config with the layer-to-layer glue, and
compiling it for one Dynamo/Inductor graph per **layer type** (SWA, CSA, HCA), not per layer.

Per layer ``i`` the stack computes ``h = h + attn_i(attn_norm_i(h))`` (pre-norm RMSNorm, fp32 math
as the model's own norms, then the residual add in bf16), then an optional user hook ``ffn(i, h)``
(DSv4's MoE and hyper-connections are out of scope), and after the last layer the final RMSNorm.
Checkpoint names follow the DeepSeek layout: ``layers.N.attn.*``, ``layers.N.attn_norm.weight`` and
``norm.weight``, ``N`` the layer's number in the config (also for a subset of layers).

Why one graph per layer type: Dynamo keeps its compiled graphs on the *code object* it traced, at
most ``torch._dynamo.config.recompile_limit`` (8) per code object, and each ``torch.compile(...)``
with Inductor options builds a new backend object that no other compile's graph matches
(``BACKEND_MATCH``). ``dsv4_compile.compile`` therefore gives every call a code object of its own (a
trampoline), so compiling layer by layer the README way works for any number of layers, at one
compile per layer; sharing graphs between layers needs one code object and one backend, which is
what this module's per-type functions and its registry provide. The guards themselves do not tell
layers of one type apart: ``inline_inbuilt_nn_modules`` (on by default since torch 2.5) lifts every
parameter and buffer into a graph input and guards the module's plain attributes by value, not the
module's identity. Tracing several layer *types* through one code object
is harmful too: on the second type Dynamo's automatic-dynamic marks ``compress_ratio``, block sizes
and the caches' page bytes dynamic, so later graphs carry symbolic sizes where the kernels want
constants.

So ``compile()`` compiles, once per layer type, a function ``block(h, meta, cache, attn, attn_norm)``
that takes the layer module, its norm and its caches as *arguments* (their tensors become graph
inputs), each type with a code object of its own (a copy of ``_block``'s, named after the type):
one Dynamo graph per type, the layers of a type sharing it, no automatic-dynamic crosstalk between
types, and each code object's recompile budget untouched by the others. The compiled functions are
kept in a process-wide registry keyed by the config, the layer type, the layer options and the
compile options, so a second stack of the same model in the process (a second scenario, a reloaded
model) reuses them without tracing again. The forward is then a Python loop over the layers calling the
type's compiled block: a graph break between layers, no per-layer compile, and under a CUDA-graph
runner the whole loop is captured into one graph per capture size.

``compile_layer(layer)`` gives the same per-type sharing to code that drives layers one by one.
Compiling the whole stack from outside (``compile_step(lambda x, meta: stack(x, meta, caches))``)
also works: the forward then inlines every layer into one graph (traced and lowered once per
*layer*, so its compile time grows with the number of layers), which is correct but slower to
compile than ``stack.compile()``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..config import DSv4AttentionConfig
from ..runtime.cache import CacheConfig, KVCacheManager, LayerCache
from ..runtime.metadata import StepMetadata
from .attention import DeepseekV4Attention, RMSNorm

LAYER_TYPES = {0: "swa", 4: "csa", 128: "hca"}  # compress ratio -> layer type


def _block(h, meta, cache, attn, attn_norm):
    """One layer of the stack: ``h + attn(attn_norm(h))``. Compiled once per layer type (a copy of
    this code object per type); ``h`` comes first so that ``dsv4_compile.compile`` marks its token
    dim dynamic."""
    return h + attn(attn_norm(h), meta, cache)


def _attn(x, meta, cache, attn):
    """One attention layer alone (``compile_layer``), the layer an argument."""
    return attn(x, meta, cache)


_REGISTRY: dict = {}  # key -> compiled function (see _compiled)
_REGISTRY_LOCK = threading.Lock()
_NAMES = itertools.count()


def _freeze(value):
    """A hashable stand-in for a compile option: the value itself, or (type, id) for an unhashable
    object (the registry entry keeps the options, and so the object, alive)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return (type(value).__name__, id(value))


def layer_signature(layer: DeepseekV4Attention) -> tuple:
    """What a compiled layer graph depends on besides its tensors' values: the config, the layer
    type and the options that change the traced code or the tensors' shapes. Layers with equal
    signatures share a compiled graph."""
    cfg = layer.config  # every field but the per-layer ratios: a layer's graph does not depend on the others
    cfg = tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.name not in ("compress_ratios", "num_hidden_layers"))
    return (cfg, layer.compress_ratio, layer.n_heads, layer.max_model_len, layer.fp8_o_proj,
            layer.o_rope_bf16, None if layer.indexer is None else (layer.indexer.fmt, layer.indexer.hadamard),
            str(layer.cos_sin_cache.device), None if layer.tp is None else (layer.tp.group_name, layer.tp.world_size))


def _compiled(fn: Callable, kind: str, layer: DeepseekV4Attention, passes, options, compile_kw) -> Callable:
    """The compiled ``fn`` for layers like ``layer``, from the registry or compiled (lazily: the
    trace happens on the first call) under a code object of its own named after the layer type
    (``dsv4_compile.compile``'s ``name``)."""
    from ..runtime.runner import compile_step

    key = (kind, layer_signature(layer), _freeze(passes), _freeze(options), _freeze(compile_kw))
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(key)
        if entry is None:
            name = f"dsv4_{kind}_{LAYER_TYPES[layer.compress_ratio]}_{next(_NAMES)}"
            entry = (compile_step(fn, passes=passes, options=options, name=name, **compile_kw),
                     options)  # options kept alive: their ids are part of the key
            _REGISTRY[key] = entry
    return entry[0]


def clear_compiled() -> None:
    """Forget every compiled function of the registry (``torch._dynamo.reset()`` forgets their
    graphs; this also forgets the functions and the compile options they hold)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


def compile_layer(layer: DeepseekV4Attention, passes: Optional[dict] = None, options: Optional[dict] = None,
                  **compile_kw) -> Callable:
    """``fn(x, meta, cache)``: ``layer``'s forward compiled (``compile_step``: the dsv4 passes,
    ``fullgraph=True``, every token count) on a graph shared with every layer of the same
    ``layer_signature`` — the supported way to compile layers one by one (43 layers: 3 graphs).
    ``dsv4_compile.compile(layer)`` or ``compile_step(lambda x, meta: layer(x, meta, cache))`` per
    layer instead compiles one graph per layer (each call has a code object of its own)."""
    fn = _compiled(_attn, "attn", layer, passes, options, compile_kw)

    def step(x, meta, cache):
        return fn(x, meta, cache, layer)

    return step


class DeepseekV4AttentionLayer(nn.Module):
    """One layer of the stack: its attention (``attn``) and pre-norm (``attn_norm``), checkpoint
    names ``attn.*`` and ``attn_norm.weight`` under ``layers.N.``."""

    def __init__(self, attn: DeepseekV4Attention, attn_norm: RMSNorm):
        super().__init__()
        self.attn, self.attn_norm = attn, attn_norm

    def forward(self, h, meta, cache):
        return _block(h, meta, cache, self.attn, self.attn_norm)


class DeepseekV4AttentionStack(nn.Module):
    """The attention layers of a DSv4 model with RMSNorm + residual glue:
    ``forward(x [T, hidden] bf16, meta, caches) -> [T, hidden] bf16``.

    Args:
        config: the model config.
        layer_ids: the layers (default every entry of ``config.compress_ratios``, the MTP layer last);
            ``caches[i]`` of the forward belongs to ``layer_ids[i]`` (``KVCacheManager(config,
            stack.layer_ids, ...)``, or ``stack.cache_manager(...)``).
        max_model_len, dtype, device, **layer_kw: passed to every ``DeepseekV4Attention``.
        ffn: optional ``ffn(layer_id, h) -> h`` run after each layer's attention block (the MoE /
            hyper-connection parts, a user hook; default identity). Not a submodule: its parameters
            stay out of the stack's state dict and ``.to()``.
        final_norm: apply the final RMSNorm (checkpoint name ``norm.weight``).

    Eager by default; ``compile()`` switches the forward to one compiled graph per layer type (see
    the module doc). ``compiled_layer_types`` lists the types compiled so far.
    """

    def __init__(self, config: DSv4AttentionConfig, layer_ids: Optional[Sequence[int]] = None,
                 max_model_len: Optional[int] = None, dtype=torch.bfloat16, device=None,
                 ffn: Optional[Callable] = None, final_norm: bool = True, **layer_kw):
        super().__init__()
        n = len(config.compress_ratios)
        layer_ids = list(range(n)) if layer_ids is None else [int(i) for i in layer_ids]
        if not layer_ids:
            raise ValueError("layer_ids must name at least one layer")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids must not repeat a layer, got {layer_ids}")
        bad = [i for i in layer_ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer_ids must lie in [0, {n}), got {bad}")
        self.config, self.layer_ids = config, layer_ids
        self.layers = nn.ModuleDict({
            str(i): DeepseekV4AttentionLayer(
                DeepseekV4Attention(config, i, max_model_len=max_model_len, dtype=dtype, device=device, **layer_kw),
                RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device))
            for i in layer_ids})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device) if final_norm else None
        self.requires_grad_(False)
        self.ffn = ffn  # not a submodule (see the class doc and __setattr__)
        self._blocks: Optional[list] = None  # per layer: the compiled block of its type, after compile()

    @property
    def ffn(self) -> Optional[Callable]:
        return self.__dict__.get("_ffn")

    def __setattr__(self, name, value):
        if name == "ffn":  # a plain attribute even for an nn.Module hook: not in state_dict / .to()
            if value is not None and not callable(value):
                raise ValueError(f"ffn must be a callable ffn(layer_id, h) -> h, got {type(value).__name__}")
            self.__dict__["_ffn"] = value
            return
        super().__setattr__(name, value)

    def layer_types(self) -> list[str]:
        """``"swa"`` / ``"csa"`` / ``"hca"`` of each layer, in ``layer_ids`` order."""
        return [LAYER_TYPES[self.config.compress_ratio(i)] for i in self.layer_ids]

    def cache_manager(self, cache_config: CacheConfig, device=None, single_pool: bool = False) -> KVCacheManager:
        """One ``KVCacheManager`` for every layer of the stack (``caches[i]`` is ``layer_ids[i]``'s)."""
        return KVCacheManager(self.config, self.layer_ids, cache_config, device=device, single_pool=single_pool)

    # --- compile -----------------------------------------------------------------------------------
    def compile(self, passes: Optional[dict] = None, options: Optional[dict] = None, **compile_kw) -> None:
        """Compile the forward per layer type, in place (``nn.Module.compile``'s convention): each
        layer then runs its type's compiled ``block`` (``runtime.compile_step``: the dsv4 passes,
        ``fullgraph=True``, one graph for every token count; ``passes`` / ``options`` / other keywords
        as there). Graphs are traced on first use and shared with every stack of the same model and
        options (see the module doc). Call it after moving the stack (``.to()``), and again to change
        the options. Unlike ``nn.Module.compile`` it does not ``torch.compile`` the whole forward,
        which would trace every layer into one graph (see the module doc)."""
        self._blocks = [_compiled(_block, "block", layer.attn, passes, options, compile_kw)
                        for layer in self.layers.values()]

    def uncompile(self) -> None:
        """Back to the eager forward."""
        self._blocks = None

    @property
    def compiled_layer_types(self) -> list[str]:
        """The layer types with a compiled block (sorted; empty while eager)."""
        return sorted(set(self.layer_types())) if self._blocks is not None else []

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, meta: StepMetadata, caches: Sequence[LayerCache]) -> torch.Tensor:
        """``x [T, hidden]`` → ``[T, hidden]``; ``caches`` the ``LayerCache`` of each layer in
        ``layer_ids`` order (``KVCacheManager.caches``)."""
        if isinstance(caches, KVCacheManager):
            if caches.layer_ids != self.layer_ids:
                raise ValueError(f"the cache manager holds layers {caches.layer_ids}, the stack {self.layer_ids}")
            caches = caches.caches
        caches = list(caches)
        if len(caches) != len(self.layer_ids):
            raise ValueError(f"caches must hold one LayerCache per layer of the stack ({len(self.layer_ids)}, in "
                             f"layer_ids order), got {len(caches)}")
        # traced by an outer torch.compile: inline the plain blocks (one graph for the whole stack)
        blocks = self._blocks if self._blocks is not None and not torch.compiler.is_compiling() else None
        ffn, h = self.ffn, x
        for k, (i, layer) in enumerate(zip(self.layer_ids, self.layers.values())):
            if blocks is None:
                h = _block(h, meta, caches[k], layer.attn, layer.attn_norm)
            else:
                h = blocks[k](h, meta, caches[k], layer.attn, layer.attn_norm)
            if ffn is not None:
                h = ffn(i, h)
        return self.norm(h) if self.norm is not None else h

    def extra_repr(self) -> str:
        types_ = self.layer_types()
        counts = ", ".join(f"{t}={types_.count(t)}" for t in ("swa", "csa", "hca") if t in types_)
        return f"layers={len(self.layer_ids)} ({counts}), compiled={self._blocks is not None}"
