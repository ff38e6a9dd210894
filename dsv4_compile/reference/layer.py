"""A dense, cache-free reference of one ``DeepseekV4Attention`` layer (docs/numerics.md §2) for one request.

``dense_attention(layer, x, positions)`` recomputes the whole layer from the module's parameters for
a request whose tokens ``0..S-1`` are all given at once: no paged cache, block table, slot mapping,
index list or ``torch.ops.dsv4`` op. Every candidate set is a boolean mask over dense key tensors:

* SWA: query ``p`` sees positions ``max(0, p-window+1) .. p`` (docs/numerics.md §2.7);
* compressed entry ``i`` (closed window, ``(i+1)·r <= S``) is visible to ``p`` iff ``i < (p+1)//r``;
  HCA (r=128) attends to every visible entry, CSA (r=4) to the ``topk`` visible entries of largest
  indexer score (all of them when at most ``topk`` are visible).

The caches' quantization is reproduced as fake quantization (quantize, then dequantize) at the
places the serving stack quantizes: the SWA K=V and main compressed entries as their ``fp8_ds_mla``
record (nope 64-blocks e4m3 with UE8M0 scale, rope bf16), the indexer K as its FP8 / MXFP4 record,
the indexer q as its FP8 / MXFP4 value, and, with ``layer.fp8_o_proj``, the ``wo_a`` input.

The element-wise numerics are those of the ops (``reference.quant``, ``reference.rope``, the
compressor's ``exp_fp32`` / ``tree_sum`` / ``rms_norm``), so on CPU the paged layer and this file
differ only in the reduction order of GEMMs over a different number of rows and of the attention sums.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import layouts
from .compressor import exp_fp32, rms_norm, tree_sum
from .quant import fp8_block_quant, mxfp4_dequant, mxfp4_quant
from .rope import hadamard, rope


def rms_normalize(x: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's activation RMSNorm (q / kv latents, per-head q): fp32 math over the last dim, one
    rounding to ``x.dtype``, weighted when ``weight`` is given. The model calls this same function."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _fp8_dequant(x: torch.Tensor, block: int, floor: float) -> torch.Tensor:
    """fp32 ``e4m3(x / 2^e) · 2^e`` per ``block`` elements (UE8M0 scale, amax floored at ``floor``)."""
    q, scale = fp8_block_quant(x, block, floor)
    return (q.float().unflatten(-1, (-1, block)) * scale.unsqueeze(-1)).flatten(-2)


def fake_quant_fp8_ds_mla(kv: torch.Tensor) -> torch.Tensor:
    """bf16 ``[N, 512]`` as an ``fp8_ds_mla`` record holds it (docs/numerics.md §5.2): nope dims e4m3 in 64-blocks
    with UE8M0 scales (amax floor 1e-4), dequantized and rounded to bf16; rope dims bf16 as they are."""
    nope = _fp8_dequant(kv[..., : layouts.KV_NOPE_DIM], layouts.KV_QUANT_BLOCK, layouts.FP8_AMAX_FLOOR)
    return torch.cat((nope.to(torch.bfloat16), kv[..., layouts.KV_NOPE_DIM :].to(torch.bfloat16)), dim=-1)


def fake_quant_indexer(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 dequantized indexer vectors ``[..., 128]``: FP8 one 128-block (amax floor 1e-4) or MXFP4."""
    if fmt == "fp8":
        return _fp8_dequant(x, layouts.INDEXER_HEAD_DIM, layouts.FP8_AMAX_FLOOR)
    if fmt == "mxfp4":
        return mxfp4_dequant(*mxfp4_quant(x))
    raise ValueError(f"unknown indexer format {fmt!r}")


def compressed_entries(compressor, x: torch.Tensor, cos_sin_cache: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16 ``[S // r, d]`` entries of every closed window (docs/numerics.md §6.2), before the cache's quantization
    (after the indexer's optional Hadamard, which the caller applies).

    C128: entry i pools rows ``128i .. 128i+127``. C4: entry i pools 8 rows, the A halves of window
    ``i-1`` (absent for i = 0) then the B halves of window i. Per channel: softmax over the rows of
    ``score + ape[p % r]``, then RMSNorm (fp32) and RoPE at ``i·r`` (fp32), rounded to bf16 once.
    """
    r = compressor.ape.shape[0]
    d = compressor.norm.weight.shape[0]
    coff = layouts.compress_overlap(r)
    w = coff * d
    s = x.shape[0]
    n = s // r
    pos = torch.arange(n * r, device=x.device)
    # the fp32 GEMM of the bf16 values (exact products summed in fp32, as the model's linear_fp32)
    kv = F.linear(x[: n * r].float(), compressor.wkv.weight.float())
    score = F.linear(x[: n * r].float(), compressor.wgate.weight.float()) + compressor.ape.float()[pos % r]
    if coff == 1:
        kv_rows, sc_rows = kv.view(n, r, w), score.view(n, r, w)
        valid = torch.ones(n, r, 1, dtype=torch.bool, device=x.device)
    else:
        kv_a, kv_b = kv[:, :d].reshape(n, r, d), kv[:, d:].reshape(n, r, d)
        sc_a, sc_b = score[:, :d].reshape(n, r, d), score[:, d:].reshape(n, r, d)
        # entry i: A halves of window i-1 (rows 0..r-1), then B halves of window i (rows r..2r-1)
        kv_prev = torch.cat((kv_a.new_zeros(1, r, d), kv_a[:-1]), dim=0)[:n]
        sc_prev = torch.cat((sc_a.new_full((1, r, d), float("-inf")), sc_a[:-1]), dim=0)[:n]
        kv_rows, sc_rows = torch.cat((kv_prev, kv_b), dim=1), torch.cat((sc_prev, sc_b), dim=1)
        has_prev = (torch.arange(n, device=x.device) > 0)[:, None, None].expand(n, r, 1)
        valid = torch.cat((has_prev, torch.ones(n, r, 1, dtype=torch.bool, device=x.device)), dim=1)
    sc_rows = torch.where(valid, sc_rows, float("-inf"))
    kv_rows = torch.where(valid, kv_rows, 0.0)
    m = sc_rows.amax(dim=1, keepdim=True)
    e = torch.where(valid, exp_fp32(sc_rows - m), 0.0)
    pooled = tree_sum(e * kv_rows, 1) / tree_sum(e, 1)
    y = rope(rms_norm(pooled, compressor.norm.weight, eps), torch.arange(n, device=x.device) * r, cos_sin_cache)
    return y.to(torch.bfloat16)


def indexer_scores(layer, qr: torch.Tensor, x: torch.Tensor, positions: torch.Tensor,
                   k_hat: torch.Tensor) -> torch.Tensor:
    """fp32 ``I [S, n]`` = ``Σ_h w'[p,h] · ReLU(q̂[p,h] · k̂[i])`` (docs/numerics.md §7.2), −inf where ``i`` is not
    visible to ``p``. ``q̂`` is the dequantized FP8 / MXFP4 indexer query (RoPE at p → bf16 →
    [Hadamard → bf16] → quant), ``w' = weights_proj(x) · 128^-0.5 · H^-0.5``."""
    idx = layer.indexer
    s, n_heads, hd = x.shape[0], idx.weights_proj.weight.shape[0], layouts.INDEXER_HEAD_DIM
    q = F.linear(qr, idx.wq_b.weight).view(s, n_heads, hd)
    q = rope(q, positions, layer.cos_sin_cache)
    if idx.hadamard:
        q = hadamard(q, hd**-0.5)
    q_hat = fake_quant_indexer(q, idx.fmt)
    # x @ weights_proj^T summed in fp32, not rounded to bf16 (docs/numerics.md §7.1); one rounded constant
    w = F.linear(x.float(), idx.weights_proj.weight.float()) * (hd**-0.5 * n_heads**-0.5)
    logits = (torch.relu(torch.einsum("phd,id->phi", q_hat, k_hat)) * w.unsqueeze(-1)).sum(dim=1)
    visible = torch.arange(k_hat.shape[0], device=x.device)[None, :] < ((positions + 1) // 4)[:, None]
    return torch.where(visible, logits, float("-inf"))


def dense_attention(layer, x: torch.Tensor, positions: torch.Tensor, aux: Optional[dict] = None) -> torch.Tensor:
    """``[S, hidden]`` bf16 output of ``layer`` (a ``DeepseekV4Attention``) for one request's tokens
    ``x [S, hidden]`` bf16 at ``positions = arange(S)``, computed densely (module docstring).

    ``aux``, when a dict, receives the masks and intermediates (tests use them to resolve exactly
    tied indexer scores with ``sink_attention`` and ``output_projection``): ``swa_mask [S, S]``, ``comp_mask
    [S, n]`` (compressed entries attended), ``kv [S, 512]`` / ``comp_kv [n, 512]`` (dequantized
    bf16 keys = values), ``keys`` / ``mask`` (both concatenated, as ``sink_attention`` takes them),
    ``q [S, H, 512]``, ``o [S, H, 512]`` (attention output before the inverse RoPE) and for CSA
    ``index_scores [S, n]`` (−inf where not visible).
    """
    s = x.shape[0]
    if not torch.equal(positions.cpu(), torch.arange(s)):
        raise ValueError("dense_attention takes one whole request: positions must be arange(S)")
    positions = positions.to(device=x.device, dtype=torch.int64)
    eps, cos_sin, r = layer.eps, layer.cos_sin_cache, layer.compress_ratio
    d = layouts.KV_HEAD_DIM

    # query (docs/numerics.md §2.1): weighted RMSNorm of the latent, per-head unweighted RMSNorm, RoPE
    qr = rms_normalize(F.linear(x, layer.wq_a.weight), eps, layer.q_norm.weight)
    q = rms_normalize(F.linear(qr, layer.wq_b.weight).view(s, layer.n_heads, d), eps)
    q = rope(q, positions, cos_sin)

    # the K=V head as the SWA cache holds it (docs/numerics.md §2.2)
    kv = rope(rms_normalize(F.linear(x, layer.wkv.weight), eps, layer.kv_norm.weight), positions, cos_sin)
    kv = fake_quant_fp8_ds_mla(kv)
    j = torch.arange(s, device=x.device)
    swa_mask = (j[None, :] <= positions[:, None]) & (j[None, :] > positions[:, None] - layer.window)

    keys, mask = kv, swa_mask
    if r:
        comp = compressed_entries(layer.compressor, x, cos_sin, eps)
        comp_kv = fake_quant_fp8_ds_mla(comp)
        n = comp.shape[0]
        visible = torch.arange(n, device=x.device)[None, :] < ((positions + 1) // r)[:, None]
        if r == 4:
            idx = layer.indexer
            k = compressed_entries(idx.compressor, x, cos_sin, eps)
            if idx.hadamard:
                k = hadamard(k, layouts.INDEXER_HEAD_DIM**-0.5)
            scores = indexer_scores(layer, qr, x, positions, fake_quant_indexer(k, idx.fmt))
            # rows with more than topk visible entries keep the topk best, the others all of them
            top = torch.topk(scores, min(idx.topk, n), dim=1).indices
            comp_mask = torch.where((visible.sum(dim=1) > idx.topk)[:, None],
                                    torch.zeros_like(visible).scatter_(1, top, True), visible)
            if aux is not None:
                aux["index_scores"] = scores
        else:
            comp_mask = visible
        keys, mask = torch.cat((kv, comp_kv), dim=0), torch.cat((swa_mask, comp_mask), dim=1)
        if aux is not None:
            aux["comp_mask"], aux["comp_kv"] = comp_mask, comp_kv

    o = sink_attention(q, keys, mask, layer.attn_sink, layer.softmax_scale)
    if aux is not None:
        aux.update(swa_mask=swa_mask, kv=kv, q=q, o=o, keys=keys, mask=mask)
    return output_projection(layer, o, positions)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """bf16 ``[T, H, 512]``: one softmax per (token, head) over the keys ``keys [N, 512]`` (= values)
    allowed by ``mask [T, N]``, with the raw sink logit ``sink [H]`` in the denominator only
    (docs/numerics.md §8.2); fp32 math, an empty candidate set gives 0."""
    kf = keys.float()
    logits = torch.einsum("phd,jd->phj", q.float(), kf) * scale
    logits = torch.where(mask[:, None, :], logits, float("-inf"))
    sink = sink.float()[None, :]
    m = torch.maximum(logits.amax(dim=-1), sink)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(logits - m.unsqueeze(-1))
    denom = p.sum(dim=-1) + torch.exp(sink - m)
    o = torch.einsum("phj,jd->phd", p, kf) * torch.where(denom > 0, 1.0 / denom, 0.0).unsqueeze(-1)
    return o.to(torch.bfloat16)


def output_projection(layer, o: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[T, hidden]`` (docs/numerics.md §8.3): inverse RoPE of ``o [T, H, 512]`` at the query positions, [FP8
    fake quant in 128-blocks, amax floor 1e-10; the rotation quantized in fp32 when the layer has
    ``o_rope_bf16=False``, vLLM's bytes], grouped ``wo_a`` einsum in bf16, then ``wo_b``."""
    vllm_bytes = layer.fp8_o_proj and not getattr(layer, "o_rope_bf16", True)
    og = rope(o.float() if vllm_bytes else o, positions, layer.cos_sin_cache, inverse=True)
    og = og.reshape(o.shape[0], layer.n_groups, o.shape[1] * o.shape[2] // layer.n_groups)
    if layer.fp8_o_proj:
        og = _fp8_dequant(og, layouts.O_PROJ_QUANT_BLOCK, layouts.INV_ROPE_AMAX_FLOOR).to(torch.bfloat16)
    wo_a = layer.wo_a.weight.view(layer.n_groups, -1, og.shape[-1])
    z = torch.einsum("tgd,grd->tgr", og, wo_a)
    return F.linear(z.flatten(1), layer.wo_b.weight)
