"""``DeepseekV4Attention``: one DSv4 attention layer in the plain form (docs/numerics.md §2).

Readable PyTorch over the primitive ``dsv4`` ops; nothing is fused by hand. Under
``dsv4_compile.compile`` the passes rewrite

* ``rope → kv_insert`` (SWA K=V) into ``kv_rope_insert``,
* the compressor chain (state save → pool → RMSNorm → RoPE → bf16 → [Hadamard] → insert) into
  ``compressor_insert``,
* the indexer query (RoPE → quant → weight scaling) into ``indexer_q_rope_{fp8,mxfp4}``,
* ``rope(inverse) → fp8_block_quant(128)`` of the output into ``inv_rope_fp8_quant``,

and Inductor fuses the RMSNorms and the casts around the GEMMs.

Layer types (``config.compress_ratio(layer_idx)``): 0 = sliding window only (SWA), 4 = CSA
(compressor + lightning indexer + top-k), 128 = HCA (compressor, attend to every visible entry).

Tokens are flattened ``x [T, hidden]`` with per-token positions and request rows in a
``StepMetadata`` (vLLM style); the caches of the layer come in a ``LayerCache``. Parameters carry
the checkpoint's names (docs/numerics.md §1.4, relative to ``layers.N.attn.``), so a DSv4 state dict loads with
``load_state_dict``: FP8 weights with a ``<name>.scale`` block scale are dequantized to bf16 on load,
and full-size head tensors are sliced to this module's head shard.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import layouts
from ..config import DSv4AttentionConfig
from ..distributed import TensorParallel, layer_shard
from ..reference.layer import rms_normalize
from ..rope import layer_cos_sin_cache
from ..runtime.cache import LayerCache
from ..runtime.metadata import StepMetadata
from .fp8 import FP8, fp8_linear, is_fp8, project, set_linear_format
from .indexer import IndexerQ

dsv4 = torch.ops.dsv4

WEIGHT_BLOCK = layouts.WEIGHT_BLOCK  # FP8 checkpoint weights: one scale per 128x128 block


def grouped_linear(xg: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``z[t, g] = weight[g] @ xg[g, t]`` (einsum ``gtd,grd->tgr``) flattened to ``[T, G·R]``:
    ``xg [G, T, D]`` group-major, ``weight [G, R, D]``.

    One batched GEMM on CUDA, one GEMM per group on CPU (Inductor's CPU ``bmm`` lowering tests
    ``T == 1`` to pick a layout). The groups are joined with ``cat``, not by reshaping the
    ``[G, T, R]`` product's transpose: that view's stride check would also test ``T == 1``. Either
    test would specialize the compiled step on one-token batches."""
    if xg.is_cuda:
        z = torch.bmm(xg, weight.transpose(1, 2)).unbind(0)
    else:
        z = [F.linear(xg[g], weight[g]) for g in range(weight.shape[0])]
    return torch.cat(z, dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x):
        return rms_normalize(x, self.eps, self.weight)


class Compressor(nn.Module):
    """Pools every ``r`` tokens into one compressed entry (docs/numerics.md §6) and inserts it into a paged cache.

    ``head_dim`` 512 (main: ``fp8_ds_mla`` record) or 128 (indexer: FP8 / MXFP4 record, optional
    Hadamard). Partial windows live in the paged compressor-state cache, so prefill chunks and
    decode steps need no special code."""

    def __init__(self, hidden_size: int, compress_ratio: int, head_dim: int, eps: float, fmt: str,
                 hadamard: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.ratio, self.head_dim, self.eps, self.fmt, self.hadamard = compress_ratio, head_dim, eps, fmt, hadamard
        coff = layouts.compress_overlap(compress_ratio)
        self.wkv = nn.Linear(hidden_size, coff * head_dim, bias=False, dtype=dtype, device=device)
        self.wgate = nn.Linear(hidden_size, coff * head_dim, bias=False, dtype=dtype, device=device)
        self.ape = nn.Parameter(torch.randn(compress_ratio, coff * head_dim, device=device) * 0.1, requires_grad=False)
        self.norm = RMSNorm(head_dim, eps, dtype, device)
        self.state_block_size = layouts.C4_STATE_BLOCK_SIZE if compress_ratio == 4 else layouts.C128_STATE_BLOCK_SIZE

    @property
    def projections(self) -> list:
        """The linears whose outputs form ``kv_score = [kv | score]`` (in that order)."""
        return [self.wkv, self.wgate]

    def forward(self, kv_score, positions, cos_sin_cache, token_to_req, state_cache, state_slot_mapping,
                state_block_table, cache, slot_mapping, block_size: int):
        """``kv_score [T, 2·coff·d]`` fp32 = ``[x @ wkv^T | x @ wgate^T]`` (``dsv4::linear_fp32``)."""
        r, d, sbs = self.ratio, self.head_dim, self.state_block_size
        dsv4.compressor_state_save(kv_score, positions, self.ape, state_cache, state_slot_mapping, sbs)
        pooled = dsv4.compressor_pool(state_cache, positions, state_block_table, token_to_req, sbs, r, d)
        y = dsv4.rope(dsv4.rms_norm(pooled, self.norm.weight, self.eps), positions // r * r, cos_sin_cache)
        y = y.to(torch.bfloat16)
        if self.hadamard:
            y = dsv4.hadamard(y, d**-0.5)
        if self.fmt == "fp8_ds_mla":
            dsv4.kv_insert(y, cache, slot_mapping, block_size)
        else:
            dsv4.indexer_k_insert(y, cache, slot_mapping, block_size, self.fmt)


class Indexer(IndexerQ):
    """The lightning indexer (docs/numerics.md §7): the query side of ``IndexerQ`` plus its own compressor
    (head 128) writing the indexer K cache; ``forward`` returns the top-k local entry indices."""

    def __init__(self, config: DSv4AttentionConfig, fmt: str = "fp8", hadamard: bool = False,
                 dtype=torch.bfloat16, device=None):
        super().__init__(config.hidden_size, config.q_lora_rank, config.index_n_heads, config.index_head_dim, fmt,
                         hadamard, dtype, device)
        self.topk = config.index_topk
        self.compressor = Compressor(config.hidden_size, 4, config.index_head_dim, config.rms_norm_eps, fmt,
                                     hadamard, dtype, device)
        self.requires_grad_(False)

    def forward(self, qr, x, positions, cos_sin_cache, token_to_req, cache: LayerCache, c4, weights, kv_score,
                q=None):
        """``weights = weights_proj(x)`` and the compressor's ``kv_score`` come from the layer's fused
        projections of ``x``; ``q = wq_b(qr)`` from its fused projection of ``qr`` (None: computed here)."""
        bs = layouts.INDEXER_BLOCK_SIZE
        self.compressor(kv_score, positions, cos_sin_cache, token_to_req, cache.indexer_state, c4.state_slot_mapping,
                        c4.state_block_table, cache.indexer, c4.slot_mapping, bs)
        q = super().forward(qr, x, positions, cos_sin_cache, weights, q)
        q, q_scale, weights = (q[0], None, q[1]) if self.fmt == "fp8" else q
        return dsv4.indexer_topk(q, q_scale, weights, cache.indexer, c4.block_table, token_to_req, positions, bs,
                                 self.fmt, self.topk, 4)


def _check_heads(config: DSv4AttentionConfig, n_local_heads: int, head_offset: int) -> None:
    h, hpg = config.num_attention_heads, config.heads_per_group
    if not 0 < n_local_heads <= h or n_local_heads % hpg:
        raise ValueError(f"n_local_heads must be a positive multiple of the heads per output group ({hpg}) and at "
                         f"most num_attention_heads ({h}): each shard owns whole groups of wo_a, got {n_local_heads}")
    if head_offset % hpg or head_offset < 0 or head_offset + n_local_heads > h:
        raise ValueError(f"head_offset must be a multiple of {hpg} with head_offset + n_local_heads <= {h}, "
                         f"got {head_offset}")


class DeepseekV4Attention(nn.Module):
    """One DSv4 attention layer: ``forward(x [T, hidden] bf16, meta, cache) -> [T, hidden] bf16``.

    Args:
        config: the model config (``DSv4AttentionConfig.flash()/pro()/tiny()``).
        layer_idx: which layer (its compress ratio and RoPE table come from the config).
        n_local_heads: query heads of this module (a tensor-parallel shard; default all, or this
            rank's share with ``tp``). The K=V head, the compressor and the indexer are replicated.
        head_offset: first global head of the shard (used to slice full checkpoint tensors on load;
            default 0, or this rank's first head with ``tp``).
        max_model_len: rows of the RoPE table (positions must stay below) and, for HCA layers, the
            width of the "all visible entries" index row (``ceil(max_model_len / 128)``).
        indexer_fmt: "fp8" (Hopper) or "mxfp4" indexer q and K cache.
        hadamard: rotate indexer q and k before quantization (the DeepSeek reference); off = vLLM's bytes.
        fp8_o_proj: quantize the attention output to FP8 (128-blocks, UE8M0) before ``wo_a`` as vLLM's
            DeepGEMM path does (dequantized here for a bf16 einsum); off = bf16 activations.
        o_rope_bf16: with ``fp8_o_proj``, round the inverse-rotated rope dims to bf16 before that
            quant (the DeepSeek reference); off = vLLM's bytes (its fp32 rotation is quantized).
        tp: a ``dsv4_compile.distributed.TensorParallel`` group: this rank holds ``H / tp`` heads
            (``distributed.head_shard``; explicit ``n_local_heads`` / ``head_offset`` must match it)
            and the forward ends with one all-reduce (sum, bf16) of ``wo_b``'s output, a functional
            collective that compiles into the graph. The constructor is a collective: every rank
            checks its arguments against every other's and a bad configuration is a ``ValueError``
            on every rank.
        weight_format: what an FP8 checkpoint's projections (``FP8_LINEARS``: ``wq_a``, ``wkv``,
            ``wq_b``, ``wo_a``, ``wo_b``, indexer ``wq_b``) become at load: ``"fp8"`` keeps them e4m3
            with fp32 128x128 block scales and runs them as ``fp8_block_quant`` + ``fp8_block_gemm``
            (docs/numerics.md §4.5; ``wo_a`` one grouped GEMM on the FP8 ``o``, no dequant);
            ``"bf16"`` dequantizes them; ``"auto"`` (default) is ``"fp8"`` when the layer is on a
            CUDA GPU with FP8 tensor cores (sm_89+) at load time, else ``"bf16"`` (CPU, older GPUs),
            and dequantizes any weight the FP8 GEMM cannot take where ``"fp8"`` raises. bf16
            checkpoint tensors stay bf16 in every format. Decided per load: the format follows the
            state dict, so a later bf16 load turns a linear back.
    """

    def __init__(self, config: DSv4AttentionConfig, layer_idx: int, n_local_heads: Optional[int] = None,
                 head_offset: Optional[int] = None, max_model_len: Optional[int] = None, indexer_fmt: str = "fp8",
                 hadamard: bool = False, fp8_o_proj: bool = True, o_rope_bf16: bool = True,
                 dtype=torch.bfloat16, device=None, tp: Optional[TensorParallel] = None,
                 weight_format: str = "auto"):
        super().__init__()
        if tp is not None:  # first, before any check that could raise on one rank while the others wait
            n_local_heads, head_offset = layer_shard(
                tp, config, n_local_heads, head_offset, layer_idx=layer_idx, max_model_len=max_model_len,
                indexer_fmt=indexer_fmt, hadamard=hadamard, fp8_o_proj=fp8_o_proj, o_rope_bf16=o_rope_bf16,
                dtype=dtype, weight_format=weight_format)
        self.tp = tp
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        self.weight_format = weight_format
        head_offset = 0 if head_offset is None else head_offset
        if not 0 <= layer_idx < len(config.compress_ratios):
            raise ValueError(f"layer_idx must be in [0, {len(config.compress_ratios)}), got {layer_idx}")
        if dtype != torch.bfloat16:
            raise ValueError(f"the attention kernels take bf16 activations, got dtype {dtype}")
        if config.head_dim != layouts.KV_HEAD_DIM or config.qk_rope_head_dim != layouts.ROPE_DIM:
            raise ValueError(f"the cache records need head_dim {layouts.KV_HEAD_DIM} and qk_rope_head_dim "
                             f"{layouts.ROPE_DIM}, got {config.head_dim} and {config.qk_rope_head_dim}")
        if config.index_head_dim != layouts.INDEXER_HEAD_DIM:
            raise ValueError(f"index_head_dim must be {layouts.INDEXER_HEAD_DIM}, got {config.index_head_dim}")
        n_local_heads = config.num_attention_heads if n_local_heads is None else n_local_heads
        _check_heads(config, n_local_heads, head_offset)
        max_model_len = max_model_len or config.max_position_embeddings
        if not 0 < max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [1, {config.max_position_embeddings}], got {max_model_len}")
        self.config, self.layer_idx = config, layer_idx
        self.compress_ratio = config.compress_ratio(layer_idx)
        self.n_heads, self.head_offset = n_local_heads, head_offset
        self.n_groups = n_local_heads // config.heads_per_group
        self.max_model_len, self.fp8_o_proj, self.o_rope_bf16 = max_model_len, fp8_o_proj, o_rope_bf16
        self.eps, self.window, self.softmax_scale = config.rms_norm_eps, config.sliding_window, config.softmax_scale
        d, hidden = config.head_dim, config.hidden_size
        kw = dict(bias=False, dtype=dtype, device=device)

        self.wq_a = nn.Linear(hidden, config.q_lora_rank, **kw)
        self.q_norm = RMSNorm(config.q_lora_rank, self.eps, dtype, device)
        self.wq_b = nn.Linear(config.q_lora_rank, n_local_heads * d, **kw)
        self.wkv = nn.Linear(hidden, d, **kw)
        self.kv_norm = RMSNorm(d, self.eps, dtype, device)
        self.wo_a = nn.Linear(config.heads_per_group * d, self.n_groups * config.o_lora_rank, **kw)
        self.wo_b = nn.Linear(self.n_groups * config.o_lora_rank, hidden, **kw)
        self.attn_sink = nn.Parameter(torch.randn(n_local_heads, device=device), requires_grad=False)
        self.compressor = self.indexer = None
        if self.compress_ratio:
            self.compressor = Compressor(hidden, self.compress_ratio, d, self.eps, "fp8_ds_mla", dtype=dtype,
                                         device=device)
        if self.compress_ratio == 4:
            self.indexer = Indexer(config, indexer_fmt, hadamard, dtype, device)
        self.comp_block_size = {0: 1, 4: layouts.C4_BLOCK_SIZE, 128: layouts.C128_BLOCK_SIZE}[self.compress_ratio]
        # HCA attends to every visible entry: a fixed-width row of ceil(max_model_len / 128) slots.
        self.comp_width = math.ceil(max_model_len / 128) if self.compress_ratio == 128 else 0
        self.register_buffer("cos_sin_cache", self._rope_table(max_model_len, device), persistent=False)
        self.requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._convert_checkpoint)
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh())
        self._fuse_projections()

    # --- fused projections ---------------------------------------------------------------------
    def _x_groups(self) -> dict:
        """The fused projections, each ``[(name, linear), ...]`` in the column order of its output:
        ``x_proj`` the bf16 linears of ``x`` among ``wq_a``, ``wkv`` (one bf16 GEMM);
        ``x_proj_fp8`` those kept in FP8 (one FP8 GEMM); ``comp_proj`` the fp32-out GEMM of ``x``:
        the indexer's ``weights_proj`` (its fp32 sums feed the fp32 indexer weights unrounded), then
        each compressor's ``wkv``, ``wgate`` (``kv_score``); ``q_proj`` ``wq_b`` and the indexer's
        ``wq_b``, both projections of ``qr`` (one GEMM when both have one format and the indexer's
        rows are whole main heads: ``index_n_heads`` a multiple of 4)."""
        xs = [("wq_a", self.wq_a), ("wkv", self.wkv)]
        comp = [("weights_proj", self.indexer.weights_proj)] if self.indexer is not None else []
        comp += [("", lin) for lin in (self.compressor.projections if self.compressor is not None else []) + (
            self.indexer.compressor.projections if self.indexer is not None else [])]
        qs = [("wq_b", self.wq_b)]
        # one format, and whole main heads of columns before and after the indexer's (head views)
        if (self.indexer is not None and is_fp8(self.indexer.wq_b) == is_fp8(self.wq_b)
                and self.indexer.wq_b.weight.shape[0] % self.config.head_dim == 0):
            qs.append(("index_q", self.indexer.wq_b))
        return {"x_proj": [p for p in xs if not is_fp8(p[1])], "x_proj_fp8": [p for p in xs if is_fp8(p[1])],
                "comp_proj": comp, "q_proj": qs if len(qs) > 1 else []}

    def _fuse_projections(self) -> None:
        """One weight per GEMM (vLLM's ``fused_wqa_wkv``): the checkpoint-named parameters become row
        views of a fused buffer (FP8 weights: their block scales too, ``<group>_scale``), so loading a
        state dict writes into it and one GEMM replaces two to seven per step. Re-run after anything
        that may replace parameters (``.to()``, ``load_state_dict``, deepcopy); a no-op while they
        still are the views (the buffer keeps its address, so captured CUDA graphs stay valid across
        in-place weight reloads)."""
        for name, members in self._x_groups().items():
            linears = [lin for _, lin in members]
            fp8 = bool(linears) and is_fp8(linears[0])
            if not fp8:
                self.register_buffer(name + "_scale", None, persistent=False)
            if not linears:
                self.register_buffer(name, None, persistent=False)
                continue
            if self._still_fused(getattr(self, name, None), [lin.weight for lin in linears]) and (
                    not fp8 or self._still_fused(getattr(self, name + "_scale", None), [lin.scale for lin in linears])):
                continue
            fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
            row = 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight = nn.Parameter(fused[row:row + n], requires_grad=False)
                row += n
            self.register_buffer(name, fused, persistent=False)
            if fp8:  # whole 128-row blocks (checked at load, _fp8_unusable): the scales line up
                scales = torch.cat([lin.scale for lin in linears], dim=0)
                row = 0
                for lin in linears:
                    n = lin.scale.shape[0]
                    lin._buffers["scale"] = scales[row:row + n]
                    row += n
                self.register_buffer(name + "_scale", scales, persistent=False)

    @staticmethod
    def _still_fused(fused, tensors) -> bool:
        if fused is None:
            return False
        row, base = 0, fused.untyped_storage().data_ptr()
        for w in tensors:
            if (w.untyped_storage().data_ptr() != base or w.dtype != fused.dtype
                    or w.storage_offset() != fused.storage_offset() + row * fused.stride(0)):
                return False
            row += w.shape[0]
        return row == fused.shape[0]

    def _fp8_linears(self) -> list:
        """(name, linear) of the projections a checkpoint may ship in FP8 (the ``FP8_LINEARS``)."""
        return [(name, self.get_submodule(name)) for name in FP8_LINEARS
                if not name.startswith("indexer.") or self.indexer is not None]

    @staticmethod
    def _split(members: list, h: torch.Tensor) -> tuple[dict, int]:
        """The columns of each named member of a group (``_x_groups``) in its GEMM output ``h``, and
        the column where its unnamed members (the compressors') start."""
        cols, c = {}, 0
        for key, lin in members:
            if not key:
                break
            n = lin.weight.shape[0]
            cols[key] = h[:, c:c + n]
            c += n
        return cols, c

    def _project_x(self, x):
        """``(qa, kva, indexer weights (fp32) or None, kv_score or None)`` from the fused projections
        of ``x`` (``kv_score``: the compressors' fp32 ``[kv | score]`` columns, the indexer's last)."""
        cols, kv_score, groups = {}, None, self._x_groups()
        if self.x_proj_fp8 is not None:
            cols.update(self._split(groups["x_proj_fp8"], fp8_linear(x, self.x_proj_fp8, self.x_proj_fp8_scale))[0])
        if self.x_proj is not None:
            cols.update(self._split(groups["x_proj"], F.linear(x, self.x_proj))[0])
        if self.comp_proj is not None:
            h = dsv4.linear_fp32(x, self.comp_proj)
            named, c = self._split(groups["comp_proj"], h)
            cols.update(named)
            kv_score = h[:, c:]
        return cols["wq_a"], cols["wkv"], cols.get("weights_proj"), kv_score

    def _project_q(self, qr):
        """``(q [T, n_heads, head_dim], indexer q [T, index_n_heads, index_head_dim] or None)``:
        ``wq_b(qr)`` and the indexer's ``wq_b(qr)``, one GEMM when they are fused (``q_proj``). Each
        is a head view of the whole ``[T, N]`` output, never a view of a column slice: viewing a
        slice tests ``T == 1`` (its strides depend on it), which would specialize the compiled step."""
        t, d = qr.shape[0], self.config.head_dim
        if self.q_proj is None:
            return project(self.wq_b, qr).view(t, self.n_heads, d), None
        h = fp8_linear(qr, self.q_proj, self.q_proj_scale) if self.q_proj_scale is not None else F.linear(
            qr, self.q_proj)
        n, di = h.shape[1], self.indexer.head_dim
        q = h.view(t, n // d, d)[:, :self.n_heads]
        return q, h.view(t, n // di, di)[:, self.n_heads * d // di:]

    def _refresh(self) -> None:
        self._fuse_projections()
        self._check_rope_table()

    def _dtype_kept_tensors(self) -> list:
        """(owner, name, tensor) of the tensors whose dtype a model dtype conversion keeps: fp32 ones
        (docs/numerics.md §1.4: the sink logits, the compressors' position biases, the RoPE table, the
        FP8 weights' block scales) and the FP8 weights themselves."""
        out = [(self, "attn_sink"), (self, "cos_sin_cache")]
        fp8 = [lin for _, lin in self._fp8_linears() if is_fp8(lin)]
        out += [(lin, "scale") for lin in fp8] + [(lin, "weight") for lin in fp8]
        for comp in (self.compressor, self.indexer.compressor if self.indexer is not None else None):
            if comp is not None:
                out.append((comp, "ape"))
        # detached: a conversion re-points a parameter's .data, so keep the tensor, not the parameter
        return [(owner, name, getattr(owner, name).detach()) for owner, name in out]

    def _apply(self, fn, recurse=True):
        keep = self._dtype_kept_tensors()
        super()._apply(fn, recurse)
        # a dtype conversion (``.to(torch.bfloat16)``, ``.half()``) leaves the fp32 tensors fp32 and the
        # FP8 weights FP8, with their exact values (a cast would round the RoPE table and the sink
        # silently, and turn e4m3 weights into unscaled bf16 ones)
        for owner, name, old in keep:
            new = getattr(owner, name)
            if new.dtype != old.dtype and old.dtype in (torch.float32, FP8) and old.device.type != "meta":
                restored = old.to(device=new.device)
                if isinstance(new, nn.Parameter):
                    new.data = restored
                else:
                    setattr(owner, name, restored)
        self._refresh()  # .to() / .cuda() convert each parameter separately; to_empty() drops the table
        return self

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        new._fuse_projections()  # Parameter deepcopy clones each view separately
        return new

    def _rope_table(self, max_pos: int, device) -> torch.Tensor:
        return layer_cos_sin_cache(self.config, self.layer_idx, max_pos, device=device)

    def _check_rope_table(self) -> None:
        """Rebuild the (non-persistent) RoPE table when it no longer holds its values — after
        ``to_empty()`` — checked on its first rows (cheap) before paying for a rebuild."""
        table = self.cos_sin_cache
        if table.device.type == "meta":
            return
        head = self._rope_table(2, table.device).to(table.dtype)
        if not torch.equal(table[:2], head):
            self.cos_sin_cache = self._rope_table(self.max_model_len, table.device).to(table.dtype)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, meta: StepMetadata, cache: LayerCache) -> torch.Tensor:
        """``x [T, hidden]`` (T may be 0) → ``[T, hidden]``; ``meta`` from ``StepMetadataBuilder``,
        ``cache`` this layer's ``LayerCache`` (``ValueError`` when either is missing or lacks what the
        layer type needs)."""
        if not isinstance(meta, StepMetadata):
            raise ValueError(f"meta must be the StepMetadata of the step (StepMetadataBuilder.build / .view), "
                             f"got {type(meta).__name__}")
        if not isinstance(cache, LayerCache):
            raise ValueError(f"cache must be this layer's LayerCache (KVCacheManager.caches[i]), got {type(cache).__name__}")
        needed = ("swa",) + (("compressed", "compressor_state") if self.compress_ratio else ()) + (
            ("indexer", "indexer_state") if self.compress_ratio == 4 else ())
        missing = [f for f in needed if getattr(cache, f) is None]
        if missing:
            raise ValueError(f"layer {self.layer_idx} (compress ratio {self.compress_ratio}) needs the caches "
                             f"{list(needed)}; this LayerCache lacks {missing}")
        rows = self.cos_sin_cache.shape[0]
        if meta.max_model_len is not None and rows < meta.max_model_len:
            # checked on the host before any kernel runs: past row ``rows`` the RoPE kernels have no
            # angle to rotate by (they would write NaN rope dims: docs/numerics.md §9.4)
            raise ValueError(f"layer {self.layer_idx} has RoPE tables of {rows} positions (max_model_len={rows}) "
                             f"but the runtime admits positions up to {meta.max_model_len - 1} "
                             f"(CacheConfig.max_model_len={meta.max_model_len}): build the layer with "
                             f"max_model_len >= {meta.max_model_len}")
        t = x.shape[0]
        if meta.positions.shape[0] != t:
            raise ValueError(f"x has {t} token rows but the step metadata has {meta.positions.shape[0]}")
        torch._check(meta.positions.shape[0] == t)
        positions, token_to_req, cos_sin = meta.positions, meta.token_to_req, self.cos_sin_cache
        swa_bs = layouts.SWA_BLOCK_SIZE

        # one GEMM for every bf16 projection of x (q latent, K=V head, indexer weights), one fp32-out GEMM
        # for both compressors' [kv | score]
        qa, kva, index_weights, kv_score = self._project_x(x)

        # query: low-rank projection, RMSNorm, per-head unweighted RMSNorm, RoPE on the last 64 dims
        # (wq_b and the indexer's wq_b: one GEMM of qr)
        qr = self.q_norm(qa)
        q, index_q = self._project_q(qr)
        q = rms_normalize(q, self.eps)
        q = dsv4.rope(q, positions, cos_sin)

        # the single K=V head: RMSNorm, RoPE, FP8 into the paged SWA cache
        kv = dsv4.rope(self.kv_norm(kva), positions, cos_sin)
        dsv4.kv_insert(kv, cache.swa, meta.swa_slot_mapping, swa_bs)
        swa_indices, _ = dsv4.swa_indices(positions, meta.swa_block_table, token_to_req, swa_bs, self.window)

        comp_cache = comp_indices = None
        if self.compress_ratio:
            r, bs = self.compress_ratio, self.comp_block_size
            cm = meta.compressed(r)
            w_main = self.compressor.wkv.weight.shape[0] * 2
            self.compressor(kv_score[:, :w_main], positions, cos_sin, token_to_req, cache.compressor_state,
                            cm.state_slot_mapping, cm.state_block_table, cache.compressed, cm.slot_mapping, bs)
            if r == 4:
                topk = self.indexer(qr, x, positions, cos_sin, token_to_req, cache, cm, weights=index_weights,
                                    kv_score=kv_score[:, w_main:], q=index_q)
                comp_indices, _ = dsv4.global_topk_indices(topk, cm.block_table, token_to_req, bs)
            else:
                comp_indices, _ = dsv4.compressed_indices(positions, cm.block_table, token_to_req, bs, r,
                                                          self.comp_width)
            comp_cache = cache.compressed

        o = dsv4.sparse_attn(q, cache.swa, swa_indices, comp_cache, comp_indices, self.attn_sink, self.softmax_scale,
                             swa_bs, self.comp_block_size)

        # output: inverse RoPE at the query position, [FP8 activations], grouped low-rank projection
        fp8_wo_a = is_fp8(self.wo_a)
        quant = self.fp8_o_proj or fp8_wo_a
        if quant and not self.o_rope_bf16:
            o = o.float()  # vLLM's bytes: the fp32 rotation goes into the quant unrounded
        o = dsv4.rope(o, positions, cos_sin, inverse=True)
        o = o.view(t, self.n_groups, self.config.heads_per_group * self.config.head_dim)
        if quant:
            o_fp8, o_scale = dsv4.fp8_block_quant(o, layouts.O_PROJ_QUANT_BLOCK, layouts.INV_ROPE_AMAX_FLOOR)
        if fp8_wo_a:
            # one grouped FP8 GEMM on the FP8 o as quantized (no dequant): group g's input columns
            # times its rows of wo_a, whole 128-row blocks (o_lora_rank % 128 == 0, checked at load)
            z = dsv4.fp8_block_gemm(o_fp8, o_scale, self.wo_a.weight, self.wo_a.scale)
        else:
            if quant:
                # group-major [G, T, D] (the fused quant's native layout) dequantized exactly to bf16: each
                # element times its 128-block's scale, gathered rather than reshaped
                block = torch.arange(o.shape[-1], device=o.device) // layouts.O_PROJ_QUANT_BLOCK
                og = (o_fp8.transpose(0, 1).float() * o_scale.transpose(0, 1)[:, :, block]).to(x.dtype)
            else:
                og = o.transpose(0, 1)
            z = grouped_linear(og, self.wo_a.weight.view(self.n_groups, -1, o.shape[-1]))
        y = project(self.wo_b, z)
        if self.tp is not None:  # wo_b is row-parallel: sum the ranks' partial outputs (one all-reduce)
            y = self.tp.all_reduce(y)
        return y

    # --- checkpoint loading ----------------------------------------------------------------------
    def _keep_fp8(self, state_dict, prefix) -> bool:
        """Whether a load keeps the FP8 projections FP8: ``"fp8"`` always, ``"bf16"`` never, ``"auto"``
        when the layer sits on a CUDA GPU with FP8 tensor cores (sm_89 or newer); a layer on the meta
        device (``load_state_dict(assign=True)``) goes by the state dict's tensors."""
        if self.weight_format != "auto":
            return self.weight_format == "fp8"
        dev = self.wq_b.weight.device
        if dev.type == "meta":
            dev = next((v.device for k, v in state_dict.items() if k.startswith(prefix) and torch.is_tensor(v)), dev)
        return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)

    def _convert_checkpoint(self, state_dict, prefix, *args):
        """Keep or dequantize FP8 block-scaled weights, and slice full-size head tensors to this shard.

        An FP8 ``<name>.weight`` comes with one block scale per 128x128 block,
        ``[ceil(out/128), ceil(in/128)]`` fp32 or ``float8_e8m0fnu``, named ``<name>.scale`` (DeepSeek's
        reference checkpoints) or ``<name>.weight_scale_inv`` (HF-format FP8 checkpoints; the same
        multiplier despite the name). When the load keeps FP8 (``_keep_fp8``) the e4m3 weights of
        ``FP8_LINEARS`` stay FP8 (the scale becomes the fp32 ``<name>.scale`` buffer); every other FP8
        weight, and all of them otherwise, is dequantized to bf16.
        ``ValueError`` naming the key: an FP8 weight without a scale, a scale of the wrong shape or
        dtype, a scale without an FP8 weight, both scale names at once, or (``"fp8"``) a weight of
        ``FP8_LINEARS`` the FP8 GEMM cannot take (e5m2; input width not a multiple of 128; ``wo_a`` /
        ``wo_b`` with ``o_lora_rank`` not a multiple of 128, which splits a group inside a weight
        block). Every check runs before any change: a load that raises leaves the layer as it was."""
        keep = self._keep_fp8(state_dict, prefix)
        fp8_linears = dict(self._fp8_linears())
        # every check first, then any change: a load that raises leaves the layer as it was
        plan = []  # (wkey, base, linear or None, scale key or None, keep FP8)
        for wkey in [k for k in state_dict if k.startswith(prefix) and k.endswith(".weight")]:
            base = wkey[: -len(".weight")]
            name = base[len(prefix):]
            skeys = [base + s for s in WEIGHT_SCALE_SUFFIXES if base + s in state_dict]
            weight = state_dict[wkey]
            if len(skeys) > 1:
                raise ValueError(f"{wkey} has two block scales, {skeys[0]} and {skeys[1]}: keep one")
            if weight.dtype in FP8_WEIGHT_DTYPES and not skeys:
                raise ValueError(f"{wkey} is {str(weight.dtype).replace('torch.', '')} but the state dict has no "
                                 f"block scale for it ({' or '.join(base + s for s in WEIGHT_SCALE_SUFFIXES)})")
            lin = fp8_linears.get(name)
            kept = False
            if skeys:
                try:
                    check_block_scale(weight, state_dict[skeys[0]])
                except ValueError as e:
                    raise ValueError(f"{skeys[0]}: {e}") from None
                if keep and lin is not None:
                    why = self._fp8_unusable(name, weight)
                    if why is not None and self.weight_format == "fp8":
                        raise ValueError(f"{wkey}: weight_format='fp8' cannot keep it in FP8: {why}")
                    kept = why is None  # "auto": a weight the FP8 GEMM cannot take is dequantized
            plan.append((wkey, base, lin, skeys[0] if skeys else None, kept))
        planned = {skey for *_, skey, _ in plan if skey is not None}
        for skey in [k for k in state_dict if k.startswith(prefix) and k.endswith(WEIGHT_SCALE_SUFFIXES)]:
            if skey not in planned:
                raise ValueError(f"{skey} is a block scale without its FP8 weight ({skey.rsplit('.', 1)[0]}.weight)")
        for wkey, base, lin, skey, kept in plan:
            if skey is not None:
                scale = state_dict.pop(skey)
                if kept:
                    state_dict[base + ".scale"] = scale.float()
                else:
                    state_dict[wkey] = dequant_fp8_weight(state_dict[wkey], scale)
            if lin is not None:
                set_linear_format(lin, kept)
        d, hpg, r = self.config.head_dim, self.config.heads_per_group, self.config.o_lora_rank
        h0, h, g0 = self.head_offset, self.n_heads, self.head_offset // hpg
        full = self.config.num_attention_heads
        shards = {  # name: (dim, full size, slice) of head-sharded tensors
            "wq_b.weight": (0, full * d, slice(h0 * d, (h0 + h) * d)),
            "wo_a.weight": (0, full // hpg * r, slice(g0 * r, (g0 + self.n_groups) * r)),
            "wo_b.weight": (1, full // hpg * r, slice(g0 * r, (g0 + self.n_groups) * r)),
            "attn_sink": (0, full, slice(h0, h0 + h)),
        }
        b = WEIGHT_BLOCK  # the block scales of weights kept in FP8 (shards are whole blocks: checked at load)
        shards.update({
            "wq_b.scale": (0, -(-full * d // b), slice(h0 * d // b, (h0 + h) * d // b)),
            "wo_a.scale": (0, -(-full // hpg * r // b), slice(g0 * r // b, (g0 + self.n_groups) * r // b)),
            "wo_b.scale": (1, -(-full // hpg * r // b), slice(g0 * r // b, (g0 + self.n_groups) * r // b)),
        })
        for name, (dim, size, sl) in shards.items():
            t = state_dict.get(prefix + name)
            if t is not None and h != full and t.shape[dim] == size:
                state_dict[prefix + name] = t.narrow(dim, sl.start, sl.stop - sl.start)


    def _fp8_unusable(self, name: str, weight: torch.Tensor) -> Optional[str]:
        """Why ``name``'s FP8 checkpoint weight cannot run as an FP8 GEMM here, or None."""
        if weight.dtype != FP8:
            return f"it is {str(weight.dtype).replace('torch.', '')}; the FP8 GEMM takes e4m3"
        if weight.shape[1] % WEIGHT_BLOCK:
            return f"its input width {weight.shape[1]} is not a multiple of {WEIGHT_BLOCK}"
        if name in ("wq_a", "wkv") and weight.shape[0] % WEIGHT_BLOCK:
            return (f"its output width {weight.shape[0]} is not a multiple of {WEIGHT_BLOCK} (its block scales "
                    f"would not line up in the fused FP8 projection of x)")
        if name in ("wo_a", "wo_b") and self.config.o_lora_rank % WEIGHT_BLOCK:
            return (f"o_lora_rank {self.config.o_lora_rank} is not a multiple of {WEIGHT_BLOCK} (an output group "
                    f"would split a weight block)")
        return None


WEIGHT_FORMATS = ("auto", "bf16", "fp8")
# the projections DSv4 checkpoints store in FP8 (docs/numerics.md §4.5), kept FP8 under weight_format="fp8"
FP8_LINEARS = ("wq_a", "wkv", "wq_b", "wo_a", "wo_b", "indexer.wq_b")
FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")  # DeepSeek reference / HF-format FP8 checkpoints
WEIGHT_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)


def dequant_fp8_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 ``weight · scale`` for a checkpoint FP8 weight ``[out, in]`` with one scale per 128x128
    block: ``scale [ceil(out/128), ceil(in/128)]`` fp32 or ``float8_e8m0fnu`` (a power of two either
    way). ``ValueError`` for a non-FP8 weight or a scale of the wrong shape or dtype."""
    check_block_scale(weight, scale)
    out, inp = weight.shape
    s = scale.float().repeat_interleave(WEIGHT_BLOCK, 0)[:out].repeat_interleave(WEIGHT_BLOCK, 1)[:, :inp]
    return (weight.float() * s).to(torch.bfloat16)


def check_block_scale(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """``ValueError`` unless ``weight`` is FP8 ``[out, in]`` and ``scale`` its fp32 / e8m0 block scales
    ``[ceil(out/128), ceil(in/128)]``."""
    if weight.dtype not in FP8_WEIGHT_DTYPES:
        raise ValueError(f"a block scale needs an FP8 weight, got {weight.dtype}")
    if scale.dtype not in WEIGHT_SCALE_DTYPES:
        raise ValueError(f"the block scale must be float32 or float8_e8m0fnu, got {scale.dtype}")
    out, inp = weight.shape
    want = (math.ceil(out / WEIGHT_BLOCK), math.ceil(inp / WEIGHT_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"the block scale of a [{out}, {inp}] weight must be {list(want)}, got {list(scale.shape)}")
