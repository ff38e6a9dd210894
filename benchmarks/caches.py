"""Paged-cache region benchmark: KV insert (+RoPE), indexer K insert, and the three compressors.

GPU time per call under CUDA-graph replay over rotating input sets bigger than L2, GB/s over the
fewest bytes each region must move, and the fraction of the SM streaming-read bandwidth measured in
the same run (``_timing.bandwidth_ceilings``; the house style of ``benchmarks/indexer_q.py``). Regions:

* ``kv_rope_insert``: bf16 ``kv [T, 512]`` at random positions → ``fp8_ds_mla`` cache (block 64) at a
  random permutation of its slots.
* ``indexer_k_fp8`` / ``indexer_k_mxfp4``: bf16 ``k [T, 128]`` → indexer K cache (block 64).
* ``c4_main`` (r 4, d 512, fp8_ds_mla, state block 4, cache block 64), ``c4_indexer`` (r 4, d 128, fp8,
  Hadamard, state block 4, cache block 64), ``c128_main`` (r 128, d 512, state block 8, cache block 2):
  one request prefilling / decoding positions ``p0 .. p0+T−1``; fp32 ``kv_score [T, 2W]``, state pages
  for every window row in a random order, the compressed slot of entry ``p // r`` for tokens that
  close a window (−1 otherwise). ``p0 = 1024 − T`` for T < 128 (the step ends by closing a C128 and a
  C4 window: a decode step that pools) and ``p0 = 1000`` otherwise (windows straddle the chunk start);
  ``--p0`` fixes it.

Columns: our op called directly (``fused_op``); the plain dsv4 form (``dsv4.kv_insert(dsv4.rope(..))``,
``dsv4.indexer_k_insert``, the compressor chain of ``dsv4_compile/ops/compressor.py``) compiled by
``dsv4_compile.compile`` with static and dynamic token dim (the passes turn it into the fused op;
the plain indexer K insert already is one op); the same region in plain aten
(``benchmarks/_plain_caches.py``) under plain Inductor, static (one compile per T, ``cache_size_limit``
raised) and dynamic (``maybe_mark_dynamic`` on the token dim and on the cache / table sizes, which
scale with T here). Every cache carries one scratch page at its end for the plain-aten forms (slot −1
rows land there, see ``_plain_caches.py``); the ops never touch it.

Bytes: inserts read the input rows, positions, table rows, slots and write the records; the
compressor reads ``kv_score``, its four int64 index arrays, the ``ape`` rows used, each closed window's rows
once (2d fp32 per row) and its cos/sin row, and writes the state rows and the records.

    python benchmarks/caches.py [--regions kv_rope_insert c4_main ...] [--tokens 1 8 ...] [--out results.md]
    python benchmarks/caches.py --check [--no-compile]  # CPU: plain aten vs our ops, fullgraph compiles
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv4_compile  # noqa: E402
from dsv4_compile import layouts  # noqa: E402
from dsv4_compile.rope import cos_sin_cache  # noqa: E402

import _plain_caches as plain  # noqa: E402
from _timing import ceiling_fields, ceilings_line, fmt_row, pct_read, table, write_results  # noqa: E402

TOKENS = [1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384]
KV_BS = layouts.SWA_BLOCK_SIZE  # 64
IDX_BS = layouts.INDEXER_BLOCK_SIZE  # 64
EPS = 1e-6
MAX_POS = 65536
dsv4 = torch.ops.dsv4


# --- regions ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Region:
    """One benchmarked region: inputs ``make(t, seed, device, cs) -> args`` and three callables of
    ``*args``: our op, the plain dsv4 form, the plain aten form. ``dynamic`` lists ``(arg, dim)`` marked
    dynamic for the dynamic columns; ``nbytes(t)`` is the fewest bytes the region must move."""

    name: str
    make: Callable
    op: Callable
    plain_dsv4: Callable
    plain_aten: Callable
    dynamic: list
    nbytes: Callable


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _insert_slots(t, pages, bs, g, device):
    return torch.randperm(pages * bs, generator=g, device=device)[:t]


def kv_rope_region() -> Region:
    v, s = layouts.record_bytes("fp8_ds_mla")

    def make(t, seed, device, cs):
        g = _gen(device, seed)
        kv = torch.randn(t, layouts.KV_HEAD_DIM, generator=g, device=device).bfloat16()
        pos = torch.randint(0, cs.shape[0], (t,), generator=g, device=device)
        pages = -(-t // KV_BS)
        cache = torch.zeros(pages + 1, layouts.page_bytes("fp8_ds_mla", KV_BS), dtype=torch.uint8, device=device)
        return kv, pos, cs, cache, _insert_slots(t, pages, KV_BS, g, device)

    return Region(
        "kv_rope_insert", make,
        op=lambda kv, pos, cs, cache, slots: dsv4.kv_rope_insert(kv, pos, cs, cache, slots, KV_BS),
        plain_dsv4=lambda kv, pos, cs, cache, slots: dsv4.kv_insert(dsv4.rope(kv, pos, cs), cache, slots, KV_BS),
        plain_aten=lambda kv, pos, cs, cache, slots: plain.kv_rope_insert(kv, pos, cs, cache, slots, KV_BS),
        dynamic=[(0, 0), (1, 0), (3, 0), (4, 0)],
        nbytes=lambda t: t * (layouts.KV_HEAD_DIM * 2 + 8 + layouts.ROPE_DIM * 4 + 8) + t * (v + s),
    )


def indexer_k_region(fmt: str) -> Region:
    v, s = layouts.record_bytes(fmt)

    def make(t, seed, device, cs):
        g = _gen(device, seed)
        k = torch.randn(t, layouts.INDEXER_HEAD_DIM, generator=g, device=device).bfloat16()
        pages = -(-t // IDX_BS)
        cache = torch.zeros(pages + 1, layouts.page_bytes(fmt, IDX_BS), dtype=torch.uint8, device=device)
        return k, cache, _insert_slots(t, pages, IDX_BS, g, device)

    ins = lambda k, cache, slots: dsv4.indexer_k_insert(k, cache, slots, IDX_BS, fmt)  # noqa: E731
    return Region(
        f"indexer_k_{fmt}", make, op=ins, plain_dsv4=ins,
        plain_aten=lambda k, cache, slots: plain.indexer_k_insert(k, cache, slots, IDX_BS, fmt),
        dynamic=[(0, 0), (1, 0), (2, 0)],
        nbytes=lambda t: t * (layouts.INDEXER_HEAD_DIM * 2 + 8) + t * (v + s),
    )


@dataclasses.dataclass(frozen=True)
class Comp:
    name: str
    r: int
    d: int
    sbs: int
    bs: int
    fmt: str
    hadamard: bool

    @property
    def coff(self):
        return layouts.compress_overlap(self.r)

    @property
    def w(self):
        return self.coff * self.d

    @property
    def rows(self):
        return self.coff * self.r


COMPRESSORS = {
    "c4_main": Comp("c4_main", 4, layouts.KV_HEAD_DIM, layouts.C4_STATE_BLOCK_SIZE, layouts.C4_BLOCK_SIZE,
                    "fp8_ds_mla", False),
    "c4_indexer": Comp("c4_indexer", 4, layouts.INDEXER_HEAD_DIM, layouts.C4_STATE_BLOCK_SIZE,
                       layouts.INDEXER_BLOCK_SIZE, "fp8", True),
    "c128_main": Comp("c128_main", 128, layouts.KV_HEAD_DIM, layouts.C128_STATE_BLOCK_SIZE, layouts.C128_BLOCK_SIZE,
                      "fp8_ds_mla", False),
}


def start_position(t: int, p0=None) -> int:
    if p0 is not None:
        return p0
    return 1024 - t if t < 128 else 1000


def comp_request(c: Comp, p_first: int, p_last: int, g, device) -> dict:
    """What outlives a step: ape, norm weight, the state cache with pages for every window row of
    positions ``p_first .. p_last`` (random page order, prior rows random) and its block table, and
    the compressed cache with a random page order for entries ``0 .. p_last // r``. Both caches end
    with a scratch page."""
    ape = torch.randn(c.r, c.w, generator=g, device=device) * 0.5
    norm_w = (1 + 0.1 * torch.randn(c.d, generator=g, device=device)).bfloat16()
    b_lo, b_hi = max(p_first - c.rows + 1, 0) // c.sbs, p_last // c.sbs
    n_state = b_hi - b_lo + 1
    table = torch.full((1, b_hi + 1), -1, dtype=torch.int32, device=device)
    table[0, b_lo:] = torch.randperm(n_state, generator=g, device=device).int()
    state_floats = layouts.compressor_state_page_bytes(c.r, c.d, c.sbs) // 4
    state = torch.randn(n_state + 1, state_floats, generator=g, device=device).view(torch.uint8)
    n_pages = -(-(p_last // c.r + 1) // c.bs)
    cache = torch.zeros(n_pages + 1, layouts.page_bytes(c.fmt, c.bs), dtype=torch.uint8, device=device)
    entry_page = torch.randperm(n_pages, generator=g, device=device)
    return dict(ape=ape, norm_w=norm_w, table=table, state=state, cache=cache, entry_page=entry_page)


def comp_step(c: Comp, req: dict, p_start: int, t: int, g, device, cs) -> tuple:
    """The arguments of one step over positions ``p_start .. p_start+t−1`` (one request)."""
    pos = torch.arange(p_start, p_start + t, device=device)
    kv_score = torch.randn(t, 2 * c.w, generator=g, device=device)
    ssm = req["table"][0, pos // c.sbs].long() * c.sbs + pos % c.sbs
    ttr = torch.zeros(t, dtype=torch.int64, device=device)
    e = pos // c.r
    slot = req["entry_page"][e // c.bs] * c.bs + e % c.bs
    slot = torch.where((pos + 1) % c.r == 0, slot, -1)
    return (kv_score, pos, req["ape"], req["state"], ssm, req["table"], ttr, req["norm_w"], cs, req["cache"], slot)


def compressor_region(c: Comp, p0=None) -> Region:
    v, s = layouts.record_bytes(c.fmt)

    def make(t, seed, device, cs):
        g = _gen(device, seed)
        p = start_position(t, p0)
        return comp_step(c, comp_request(c, p, p + t - 1, g, device), p, t, g, device, cs)

    def op(kv_score, pos, ape, state, ssm, table, ttr, norm_w, cs, cache, slot):
        dsv4.compressor_insert(kv_score, pos, ape, state, ssm, table, ttr, c.sbs, norm_w, EPS, cs, cache, slot, c.bs,
                               c.fmt, c.hadamard)

    def chain(kv_score, pos, ape, state, ssm, table, ttr, norm_w, cs, cache, slot):
        dsv4.compressor_state_save(kv_score, pos, ape, state, ssm, c.sbs)
        pooled = dsv4.compressor_pool(state, pos, table, ttr, c.sbs, c.r, c.d)
        y = dsv4.rope(dsv4.rms_norm(pooled, norm_w, EPS), pos // c.r * c.r, cs)
        y = y.to(torch.bfloat16)
        if c.fmt == "fp8_ds_mla":
            dsv4.kv_insert(y, cache, slot, c.bs)
        else:
            if c.hadamard:
                y = dsv4.hadamard(y, c.d**-0.5)
            dsv4.indexer_k_insert(y, cache, slot, c.bs, c.fmt)

    def nbytes(t):
        p = start_position(t, p0)
        closed = (p + t) // c.r - p // c.r  # positions q in [p, p+t) with (q+1) % r == 0
        read = t * (2 * c.w * 4 + 4 * 8) + min(t, c.r) * c.w * 4
        read += closed * (c.rows * 2 * c.d * 4 + layouts.ROPE_DIM * 4)
        return read + t * 2 * c.w * 4 + closed * (v + s)

    return Region(
        c.name, make, op=op, plain_dsv4=chain,
        plain_aten=plain.make_compressor(c.r, c.d, c.sbs, c.bs, c.fmt, c.hadamard, EPS),
        dynamic=[(0, 0), (1, 0), (3, 0), (4, 0), (5, 1), (6, 0), (9, 0), (10, 0)],
        nbytes=nbytes,
    )


def regions(p0=None) -> dict:
    out = {"kv_rope_insert": kv_rope_region(), "indexer_k_fp8": indexer_k_region("fp8"),
           "indexer_k_mxfp4": indexer_k_region("mxfp4")}
    out.update({k: compressor_region(c, p0) for k, c in COMPRESSORS.items()})
    return out


def mark_dynamic(args, dims) -> None:
    for i, d in dims:
        torch._dynamo.maybe_mark_dynamic(args[i], d)


def raise_recompile_limits() -> None:
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256


# Plain Inductor keeps fused low-precision intermediates in fp32 unless told to round them like eager:
# without this the compressor's bf16 rounding before the quantization silently disappears (its records
# then differ from the reference in ~2% of the bytes). It costs a convert, not a memory pass.
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def compiled(region: Region) -> dict:
    """The four compiled columns of a region (compiled lazily on first call)."""
    aten_fn = region.plain_aten
    return {
        "ours_static": dsv4_compile.compile(region.plain_dsv4, dynamic=False),
        "ours_dynamic": dsv4_compile.compile(region.plain_dsv4),
        "inductor_static": torch.compile(aten_fn, fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS),
        "inductor_dynamic": torch.compile(aten_fn, fullgraph=True, options=INDUCTOR_OPTIONS),
    }


# --- timed mode (CUDA) --------------------------------------------------------------------------

def run(names, tokens, p0, device="cuda", timing=None):
    """Time every region at every T; ``timing`` (default ``_timing``) provides ``graph_time_us``,
    ``bandwidth_ceilings`` and ``input_sets`` (swappable for a dry run of this code on the CPU)."""
    if timing is None:
        import _timing as timing
    graph_time_us, input_sets = timing.graph_time_us, timing.input_sets

    raise_recompile_limits()
    cs = cos_sin_cache(layouts.ROPE_DIM, MAX_POS, 160000.0, device=device)
    ceil = timing.bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    regs = regions(p0)
    rows = []
    for name in names:
        reg = regs[name]
        if name in COMPRESSORS:
            c = COMPRESSORS[name]
            reg.plain_aten = plain.make_compressor(c.r, c.d, c.sbs, c.bs, c.fmt, c.hadamard, EPS, device=device)
        fns = compiled(reg)
        for t in tokens:
            nbytes = reg.nbytes(t)
            sets = input_sets(lambda i: reg.make(t, 1000 * t + i, device, cs), nbytes)
            row = {"region": name, "T": t, "bytes": nbytes, **ceiling_fields(ceil)}
            row["fused_op"] = graph_time_us([lambda a=a: reg.op(*a) for a in sets])
            for col in ("ours_static", "inductor_static"):
                row[col] = graph_time_us([lambda a=a, f=fns[col]: f(*a) for a in sets])
            del sets
            dyn_sets = input_sets(lambda i: reg.make(t, 1000 * t + 500 + i, device, cs), nbytes)
            for a in dyn_sets:
                mark_dynamic(a, reg.dynamic)
            for col in ("ours_dynamic", "inductor_dynamic"):
                row[col] = graph_time_us([lambda a=a, f=fns[col]: f(*a) for a in dyn_sets])
            del dyn_sets
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(fmt_row(row, "region", "KB"), flush=True)
    return ceil, rows


def sweep(tokens) -> None:
    """Launch-shape sweep of the kv_rope_insert kernel: tokens per program × warps, GPU µs per call."""
    import _timing as timing

    from dsv4_compile.kernels.triton import cache as kernels

    cs = cos_sin_cache(layouts.ROPE_DIM, MAX_POS, 160000.0, device="cuda")
    reg = kv_rope_region()
    for t in tokens:
        sets = timing.input_sets(lambda i: reg.make(t, 1000 * t + i, "cuda", cs), reg.nbytes(t))
        cells = []
        for bt in (1, 2, 4, 8):
            for warps in (1, 2, 4, 8):
                us = timing.graph_time_us([lambda a=a: kernels.kv_insert(a[0], a[1], a[2], a[3], a[4], KV_BS, bt, warps)
                                           for a in sets])
                cells.append(f"bt{bt}/w{warps} {us:.1f}")
        print(f"sweep kv_rope_insert T={t}: " + "  ".join(cells), flush=True)


# --- check mode (CPU) ---------------------------------------------------------------------------
def backends(tokens, out=None) -> None:
    """``kv_rope_insert``: the CuTe-DSL kernel vs the Triton kernel vs plain Inductor (the aten form,
    static T), side by side in one run, and an SM copy (``_timing``'s Triton copy kernel) of the same
    number of bytes, half read and half written (what a launch of that size can reach at best). GPU µs
    under CUDA-graph replay over input sets larger than L2; % of the SM streaming-read bandwidth
    measured in the same run."""
    import _timing as timing
    from dsv4_compile.kernels.triton import cache as triton_cache

    try:
        from dsv4_compile.kernels.cute import cache as cute_cache
    except ImportError:
        cute_cache = None
    raise_recompile_limits()
    cs = cos_sin_cache(layouts.ROPE_DIM, MAX_POS, 160000.0, device="cuda")
    ceil = timing.bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    reg = kv_rope_region()
    inductor = compiled(reg)["inductor_static"]
    kernels = {"cute": cute_cache.kv_insert if cute_cache else None, "triton": triton_cache.kv_insert}
    cols = ["cute", "triton", "inductor", "same-size SM copy"]
    lines = [f"kv_rope_insert backends. {ceilings_line(ceil)}\n", "Each cell: GPU µs per call, TB/s (% of read BW); "
             "same-size SM copy: the Triton copy kernel moving the region's byte count (half read, half written).\n",
             "| T | KB | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    rows = []
    for t in tokens:
        nbytes = reg.nbytes(t)
        sets = timing.input_sets(lambda i: reg.make(t, 1000 * t + i, "cuda", cs), nbytes)
        row = {"T": t, "bytes": nbytes, **ceiling_fields(ceil)}
        for name, k in kernels.items():
            row[name] = timing.graph_time_us([lambda a=a, k=k: k(*a, KV_BS) for a in sets]) if k else float("nan")
        row["inductor"] = timing.graph_time_us([lambda a=a: inductor(*a) for a in sets])
        # an SM copy moving the same bytes (half read, half written), over as many distinct buffers
        half = max(nbytes // 2, 1)
        bufs = timing.input_sets(lambda i: timing.sm_copy_buffers(half), 2 * half)
        row["same-size SM copy"] = timing.graph_time_us([timing.sm_copy_call(*b) for b in bufs])
        del sets, bufs
        rows.append(row)
        cells = ["n/a" if row[c] != row[c] else f"{row[c]:.1f} µs {nbytes / (row[c] * 1e-6) / 1e12:.2f} TB/s "
                 f"({pct_read(nbytes, row[c], ceil['read_tbs']):.0f}%)" for c in cols]
        lines.append(f"| {t} | {nbytes / 1e3:.0f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    timing.write_results("\n".join(lines), rows, out)


def _cache_copies(fn, args):
    """Run ``fn(*args)`` (compiled) and return the cache copies in the graphs it lowered (none = clean)."""
    from dsv4_compile.lowerings.checks import cache_copies, capture_final_graphs

    with capture_final_graphs() as graphs:
        fn(*args)
    return [p for gm in graphs for p in cache_copies(gm.graph)]


def _fresh(args, mutated):
    return tuple(a.clone() if i in mutated else a for i, a in enumerate(args))


def _fused_matches(fn_plain, args, mutated, dynamic_dims):
    """Compile the plain dsv4 form with a recording pass manager; the matches per pass and the result."""
    from dsv4_compile.lowerings.pass_manager import DSV4PassManager

    pm = DSV4PassManager(record=True)
    f = torch.compile(fn_plain, fullgraph=True, options={"post_grad_custom_post_pass": pm},
                      dynamic=False if dynamic_dims is None else None)
    a = _fresh(args, mutated)
    if dynamic_dims:
        mark_dynamic(a, dynamic_dims)
    f(*a)
    matches = {}
    for snap in pm.snapshots:
        for k, v in snap.matches.items():
            matches[k] = matches.get(k, 0) + v
    return matches, a


def check(compile_too: bool = True) -> None:
    """Plain aten (eager and, with ``compile_too``, Inductor static / dynamic, fullgraph) against our
    ops on CPU: inserts byte for byte; the compressor's state bytes exactly and its decoded records
    within quantization noise. Also checks that our passes fused the plain dsv4 forms."""
    torch.manual_seed(0)
    raise_recompile_limits()
    torch._inductor.config.fx_graph_cache = False  # the pass must run (and be recorded) on every compile
    cs = cos_sin_cache(layouts.ROPE_DIM, MAX_POS, 160000.0)
    regs = regions()
    failures = []

    def report(ok, msg):
        print(("ok   " if ok else "FAIL ") + msg, flush=True)
        if not ok:
            failures.append(msg)

    # inserts: T = 37 (and 21 through the dynamic graph), every 5th slot −1 (skip)
    for name, mutated, fused_pass in (("kv_rope_insert", {3}, "kv_rope_insert"), ("indexer_k_fp8", {1}, None),
                                      ("indexer_k_mxfp4", {1}, None)):
        reg = regs[name]
        fns = compiled(reg) if compile_too else {}
        for t in (37, 21):
            args = list(reg.make(t, t, "cpu", cs))
            slot_i = len(args) - 1
            args[slot_i] = args[slot_i].clone()
            args[slot_i][::5] = -1
            args = tuple(args)
            want = _fresh(args, mutated)
            reg.op(*want)
            ci = next(iter(mutated))
            variants = {"eager": reg.plain_aten}
            if compile_too:
                variants.update(fns)
            for vname, fn in variants.items():
                a = _fresh(args, mutated)
                if vname.endswith("dynamic"):
                    mark_dynamic(a, reg.dynamic)
                t0 = time.time()
                copies = (fn(*a) or []) if vname == "eager" else _cache_copies(fn, a)
                same = torch.equal(a[ci][:-1], want[ci][:-1])
                nbytes = int((a[ci][:-1] != want[ci][:-1]).sum())
                report(same, f"{name} T={t} plain {vname:16s}: cache bytes identical to the op "
                             f"({nbytes} differ; {time.time() - t0:.1f}s)")
                if copies:
                    report(False, f"{name} {vname}: cache copies in the compiled graph: {copies}")
            if compile_too and fused_pass and t == 37:
                for dyn in (None, reg.dynamic):
                    m, a = _fused_matches(reg.plain_dsv4, args, mutated, dyn)
                    report(m.get(fused_pass, 0) >= 1 and torch.equal(a[ci], want[ci]),
                           f"{name} T={t} plain dsv4 {'dynamic' if dyn else 'static'}: pass matches {m}, "
                           f"cache identical to the op")

    # compressor: one request, two chunks (37 then 150 tokens from p0 = 1000)
    chunks = [(1000, 37), (1037, 150)]
    for name, c in COMPRESSORS.items():
        reg = regs[name]
        fns = compiled(reg) if compile_too else {}
        g = _gen("cpu", 7)
        req = comp_request(c, chunks[0][0], chunks[-1][0] + chunks[-1][1] - 1, g, "cpu")
        steps = [comp_step(c, req, p, t, g, "cpu", cs) for p, t in chunks]
        state0, cache0 = req["state"].clone(), req["cache"].clone()

        def run_steps(fn, dyn=False, compiled=False):
            st, ca = state0.clone(), cache0.clone()
            copies = []
            for a in steps:
                a = list(a)
                a[3], a[9] = st, ca
                if dyn:
                    mark_dynamic(a, reg.dynamic)
                if compiled:
                    copies += _cache_copies(fn, a)
                else:
                    fn(*a)
            return st, ca, copies

        st_op, ca_op, _ = run_steps(reg.op)
        slots = torch.arange((ca_op.shape[0] - 1) * c.bs)
        if c.fmt == "fp8_ds_mla":
            dec = lambda ca: dsv4.kv_gather(ca, slots, c.bs).float()  # noqa: E731
        else:
            dec = lambda ca: dsv4.indexer_k_gather(ca, slots, c.bs, c.fmt)  # noqa: E731
        want = dec(ca_op)
        written = want.abs().amax(1) > 0
        n_closed = sum((p + t) // c.r - p // c.r for p, t in chunks)
        report(int(written.sum()) == n_closed, f"{name}: the op wrote {int(written.sum())} records "
                                               f"(expected {n_closed} closed windows)")
        variants = {"eager": reg.plain_aten}
        if compile_too:
            variants.update({k: v for k, v in fns.items() if k.startswith("inductor")})
        for vname, fn in variants.items():
            t0 = time.time()
            st, ca, copies = run_steps(fn, vname.endswith("dynamic"), vname != "eager")
            if copies:
                report(False, f"{name} {vname}: cache copies in the compiled graph: {copies}")
            got = dec(ca)
            state_same = torch.equal(st[:-1], st_op[:-1])
            err = (got - want).abs()
            rel = (err.norm(dim=1) / want.norm(dim=1).clamp_min(1e-30))[written]
            ulp = err / (want.abs().amax(1, keepdim=True) * 2**-3).clamp_min(1e-30)  # vs a coarse fp8 step
            ok_rec = bool((got[~written] == 0).all()) and float(rel.max()) < 3e-2
            # The plain baseline pools with torch.softmax (another fp32 summation order), so a record
            # byte may round the other way: the check is on the decoded records; the count of differing
            # cache bytes is information, not a check.
            n_diff = int((ca[:-1] != ca_op[:-1]).sum())
            report(state_same, f"{name} plain {vname:16s}: state cache bytes identical to the op")
            report(ok_rec, f"{name} plain {vname:16s}: {int(written.sum())} decoded records within quantization "
                           f"noise of the op's: max rel L2 err {float(rel.max()):.2e}, mean {float(rel.mean()):.2e}, "
                           f"max |diff| / (row amax/8) {float(ulp.max()):.2f} (not bit-exact by design: "
                           f"{n_diff} record byte(s) differ) ({time.time() - t0:.1f}s)")
        if compile_too:
            for dyn in (False, True):
                from dsv4_compile.lowerings.pass_manager import DSV4PassManager

                pm = DSV4PassManager(record=True)
                f = torch.compile(reg.plain_dsv4, fullgraph=True, options={"post_grad_custom_post_pass": pm},
                                  dynamic=None if dyn else False)
                st, ca, copies = run_steps(f, dyn, compiled=True)
                if copies:
                    report(False, f"{name} plain dsv4: cache copies in the compiled graph: {copies}")
                m = sum(s.matches.get("compressor", 0) for s in pm.snapshots)
                report(m >= 1 and torch.equal(st, st_op) and torch.equal(ca, ca_op),
                       f"{name} plain dsv4 {'dynamic' if dyn else 'static'}: compressor fused in {m} graph(s), "
                       f"state and cache bytes identical to the op")
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("all checks passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(regions())
    ap.add_argument("--regions", nargs="+", default=names, choices=names)
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--p0", type=int, default=None, help="compressor start position for every T (default: "
                                                          "1024 - T below 128, else 1000)")
    ap.add_argument("--out", default=None, help="write the markdown table (and a .json beside it) here")
    ap.add_argument("--check", action="store_true", help="CPU correctness check of the plain forms, then exit")
    ap.add_argument("--no-compile", action="store_true", help="with --check: eager plain aten only")
    ap.add_argument("--sweep", action="store_true", help="sweep the kv_rope_insert launch shape, then exit")
    ap.add_argument("--backends", action="store_true",
                    help="kv_rope_insert: CuTe vs Triton vs plain Inductor vs a same-size SM copy, then exit")
    args = ap.parse_args()
    if args.check:
        check(compile_too=not args.no_compile)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/caches.py needs a CUDA GPU (or --check, which runs on CPU)")
    if args.sweep:
        sweep(args.tokens)
        return
    if args.backends:
        backends(args.tokens, args.out)
        return
    ceil, rows = run(args.regions, args.tokens, args.p0)
    write_results(table(ceil, rows, "region", "KB"), rows, args.out)


if __name__ == "__main__":
    main()
