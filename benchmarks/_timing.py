"""GPU timing shared by the benchmarks: CUDA-graph replay time per call, and the memory-bandwidth
ceilings every table reports against, measured once per process in the same run with the same method.

The ceilings are SM-driven: a Triton kernel that streams 1 GiB through the SMs with 128-bit loads
(the *streaming read*, bytes read / time) and one that copies it (bytes read + bytes written / time),
each the fastest of a few launch shapes (persistent grids, one tile per CTA), each timed by
``graph_time_us`` like the kernels under test (1 GiB is far beyond L2, so every replay reads from
DRAM). Tables give "% of read BW": the fraction of the streaming read.

``torch``'s ``y.copy_(x)`` captured in a CUDA graph (``graph_memcpy_tbs``) was the ceiling of the
``*_h100`` tables; a captured device-to-device memcpy is not what the SMs reach (on an H200, 2.77 TB/s
against 4.2-4.3 uncaptured and 4.45-4.53 for an SM streaming read), so it is only listed beside the
ceilings for comparison with those tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def graph_time_us(fn_calls, reps: int = 20, warmup: int = 2) -> float:
    """Median GPU time per call (µs) of ``fn_calls``: a list of zero-arg callables, each one call.

    All calls are captured into one CUDA graph (so launch gaps are those of a replayed decode
    step), replayed ``reps`` times; time = median replay time / number of calls.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for f in fn_calls:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    times.sort()
    return times[len(times) // 2] / len(fn_calls)


# --- bandwidth ceilings -------------------------------------------------------------------------

@triton.jit
def _tile_index(k, tiles_per_prog, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    """Element offsets of this program's ``k``-th tile: tile ``k·grid + pid`` (``STRIDED``: the grid
    sweeps memory front to back) or ``pid·tiles_per_prog + k`` (one contiguous chunk per program)."""
    pid = tl.program_id(0)
    tile = k * tl.num_programs(0) + pid if STRIDED else pid * tiles_per_prog + k
    return tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, tiles_per_prog, BLOCK: tl.constexpr, STRIDED: tl.constexpr,
                        MASK: tl.constexpr):
    """Each program sums (int32, wrapping) ``tiles_per_prog`` tiles of ``BLOCK`` int32 with 128-bit
    loads and stores one value, so no load can be dropped. ``STRIDED``: tile ``k·grid + pid`` (the
    whole grid sweeps memory front to back); else tile ``pid·tiles_per_prog + k`` (one contiguous
    chunk per program). ``MASK``: elements at or past ``n`` are skipped."""
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(tiles_per_prog):
        idx = _tile_index(k, tiles_per_prog, BLOCK, STRIDED)
        if MASK:
            acc += tl.load(x_ptr + idx, mask=idx < n, other=0)
        else:
            acc += tl.load(x_ptr + idx)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _stream_copy_kernel(x_ptr, y_ptr, n, tiles_per_prog, BLOCK: tl.constexpr, STRIDED: tl.constexpr,
                        MASK: tl.constexpr):
    """``y = x`` over int32 with 128-bit loads and stores, tiles assigned as in ``_stream_read_kernel``."""
    for k in range(tiles_per_prog):
        idx = _tile_index(k, tiles_per_prog, BLOCK, STRIDED)
        if MASK:
            m = idx < n
            tl.store(y_ptr + idx, tl.load(x_ptr + idx, mask=m), mask=m)
        else:
            tl.store(y_ptr + idx, tl.load(x_ptr + idx))


# (tile of int32, warps, CTAs per SM or 0 for one tile per CTA, grid-stride); bandwidth_ceilings keeps the
# fastest of each kernel. On an H200 (Triton 3.6) the persistent grids read at 4.46-4.53 TB/s and
# copy at 3.8-4.0; one tile per CTA reads at 4.54 and copies at 4.15-4.18 (torch's uncaptured
# copy_: 4.25, captured in a graph: 2.76).
CEILING_CONFIGS = [(4096, 8, 4, True), (4096, 8, 8, True), (4096, 8, 8, False), (8192, 16, 8, True),
                   (8192, 16, 8, False), (4096, 16, 0, True), (8192, 16, 0, True), (8192, 32, 0, True)]
CEILING_BYTES = 1 << 30
_CEILINGS: dict = {}


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config_name(cfg) -> str:
    block, warps, ctas, strided = cfg
    if ctas == 0:
        return f"one {block * 4 // 1024} KiB tile per CTA, {warps} warps"
    return (f"persistent, {ctas} CTAs/SM x {warps} warps, {block * 4 // 1024} KiB tiles, "
            f"{'grid-stride' if strided else 'one chunk per CTA'}")


def _exact_launch(kernel, args, n_elems: int, cfg, sms: int):
    """An unmasked launch over the largest prefix of ``n_elems`` that splits into whole tiles evenly
    over the grid (``ctas`` per SM, or one tile per CTA when 0); returns (zero-arg launcher, int32
    elements covered)."""
    block, warps, ctas, strided = cfg
    grid = ctas * sms if ctas else n_elems // block
    tiles_per_prog = n_elems // block // grid
    covered = tiles_per_prog * grid * block

    def launch():
        kernel[(grid,)](*args, covered, tiles_per_prog, BLOCK=block, STRIDED=strided, MASK=False, num_warps=warps)

    return launch, covered


def graph_memcpy_tbs(nbytes: int = CEILING_BYTES, device=None) -> float:
    """``y.copy_(x)`` captured in a CUDA graph, TB/s counting bytes read + written: the ceiling of the
    ``*_h100`` tables. Not an SM bandwidth (a captured device-to-device memcpy); for comparison only."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device or "cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 4)
    return 2 * nbytes / (us * 1e-6) / 1e12


def bandwidth_ceilings(device=None, nbytes: int = CEILING_BYTES) -> dict:
    """The SM-driven bandwidth ceilings of ``device``, measured once per process (then cached):

    * ``read_tbs``: streaming read (``_stream_read_kernel``), bytes read / time: every table's
      "% of read BW" and the decode step's memory floor;
    * ``copy_tbs``: SM copy (``_stream_copy_kernel``), (bytes read + bytes written) / time;
    * ``graph_memcpy_tbs``: ``y.copy_(x)`` captured in a CUDA graph (the old ceiling), for comparison.

    Each is timed by ``graph_time_us`` (4 launches per replay, median of 20 replays) over ``nbytes``
    (1 GiB, far beyond L2), the fastest of ``CEILING_CONFIGS``; ``read_config`` / ``copy_config``
    name it. The sums and the copy are checked (a kernel that skipped its loads would be fast).
    """
    device = torch.device(device if device is not None else "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index in _CEILINGS:
        return _CEILINGS[device.index]
    sms = _num_sms(device)
    n = nbytes // 4
    x = torch.ones(n, dtype=torch.int32, device=device)
    y = torch.zeros_like(x)
    out = torch.zeros(max(c[2] * sms if c[2] else n // c[0] for c in CEILING_CONFIGS), dtype=torch.int32,
                      device=device)
    best = {"read": (0.0, None), "copy": (0.0, None)}
    for cfg in CEILING_CONFIGS:
        y.zero_()  # each config's check sees only its own stores
        out.fill_(-1)
        for kind, kernel, args, rw in (("read", _stream_read_kernel, (x, out), 1),
                                       ("copy", _stream_copy_kernel, (x, y), 2)):
            launch, covered = _exact_launch(kernel, args, n, cfg, sms)
            us = graph_time_us([launch] * 4)
            tbs = rw * covered * 4 / (us * 1e-6) / 1e12
            if tbs > best[kind][0]:
                best[kind] = (tbs, cfg)
        grid = cfg[2] * sms if cfg[2] else n // cfg[0]
        if not (bool((out[:grid] == covered // grid).all()) and bool((y[:covered] == 1).all())):
            raise RuntimeError(f"bandwidth_ceilings: the streaming kernels computed a wrong result ({cfg})")
    del x, y, out
    torch.cuda.empty_cache()
    memcpy = graph_memcpy_tbs(nbytes, device)
    torch.cuda.empty_cache()
    _COPY_CFG[device.index] = best["copy"][1]
    c = dict(read_tbs=best["read"][0], copy_tbs=best["copy"][0], graph_memcpy_tbs=memcpy, nbytes=nbytes,
             read_config=_config_name(best["read"][1]), copy_config=_config_name(best["copy"][1]),
             device=torch.cuda.get_device_name(device))
    _CEILINGS[device.index] = c
    return c


_COPY_CFG: dict = {}


def sm_copy_call(src: torch.Tensor, dst: torch.Tensor):
    """A zero-arg launcher of the SM copy kernel ``dst = src`` (contiguous, same byte count, a
    multiple of 64 bytes: allocate with ``sm_copy_buffers``): the launch shape of the fastest copy
    of ``bandwidth_ceilings``, with 4 KiB tiles when the copy is too small to give every SM one of
    its tiles, and no more programs than tiles."""
    x, y = src.view(-1).view(torch.int32), dst.view(-1).view(torch.int32)
    assert x.numel() == y.numel() and x.numel() % 16 == 0
    bandwidth_ceilings(src.device)  # measured once; fills _COPY_CFG
    block, warps, ctas, strided = _COPY_CFG[src.device.index]
    sms = _num_sms(src.device)
    n = x.numel()
    if n < block * sms:
        block, warps = 1024, 4
    tiles = -(-n // block)
    grid = min(ctas * sms, tiles) if ctas else tiles
    tiles_per_prog = -(-tiles // grid)

    def launch():
        _stream_copy_kernel[(grid,)](x, y, n, tiles_per_prog, BLOCK=block, STRIDED=strided, MASK=True,
                                     num_warps=warps)

    return launch


def sm_copy_buffers(nbytes: int, device="cuda"):
    """``(src, dst)``: two int32 buffers of at least ``nbytes`` (rounded up to 64 bytes) for ``sm_copy_call``."""
    n = max(16, -(-nbytes // 64) * 16)
    return torch.ones(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int32, device=device)


def ceilings_line(c: dict) -> str:
    """The header line every table carries: both SM ceilings, how they were measured, which one the
    percentages use, and the old captured-memcpy number."""
    return (f"Bandwidth ceilings, {c['device']}, measured in this run with the kernels' timing (CUDA-graph "
            f"replay, {c['nbytes'] / 2**30:.0f} GiB, SM-driven Triton): **streaming read {c['read_tbs']:.2f} TB/s** "
            f"({c['read_config']}), SM copy {c['copy_tbs']:.2f} TB/s read + write ({c['copy_config']}). "
            f"Every % below is of the streaming read (\"% of read BW\"). For comparison with the *_h100 tables: "
            f"torch copy_ captured in a CUDA graph (their ceiling) {c['graph_memcpy_tbs']:.2f} TB/s.")


def ceiling_fields(c: dict) -> dict:
    """The ceiling numbers stored in every JSON row."""
    return {"read_tbs": c["read_tbs"], "copy_tbs": c["copy_tbs"], "graph_memcpy_tbs": c["graph_memcpy_tbs"]}


def pct_read(nbytes: float, us: float, read_tbs: float) -> float:
    """``nbytes`` moved in ``us`` as a percentage of the streaming-read ceiling."""
    return 100 * nbytes / (us * 1e-6) / 1e12 / read_tbs


def input_sets(make, nbytes_per_set: int, min_total: int = 256 << 20, max_sets: int = 32):
    """Enough independent input sets that one pass over them exceeds L2 (50 MB on an H100 / H200)."""
    n = max(1, min(max_sets, -(-min_total // max(nbytes_per_set, 1))))
    return [make(i) for i in range(n)]


def write_results(md: str, rows: list, out) -> None:
    """Print the markdown table; with ``out``, also write it there and the rows as JSON beside it."""
    import json
    import os

    print("\n" + md)
    if out:
        with open(out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


COLS = ["fused_op", "ours_static", "ours_dynamic", "inductor_static", "inductor_dynamic"]
_UNITS = {"MB": (1e6, "8.2f", "TB/s", 1.0, "5.2f"), "KB": (1e3, "10.1f", "GB/s", 1e3, "7.1f")}


def fmt_row(r: dict, key: str, unit: str = "MB") -> str:
    """One markdown row: ``r[key]``, T, size, and per column µs, rate and % of the streaming-read ceiling."""
    div, size_fmt, rate, rate_mul, rate_fmt = _UNITS[unit]
    cells = []
    for c in COLS:
        us = r[c]
        tbs = r["bytes"] / (us * 1e-6) / 1e12
        cells.append(f"{us:9.1f} µs {tbs * rate_mul:{rate_fmt}} {rate} {100 * tbs / r['read_tbs']:3.0f}%")
    return f"| {r[key]} | {r['T']:5d} | {r['bytes'] / div:{size_fmt}} | " + " | ".join(cells) + " |"


def table(ceilings: dict, rows: list, key: str, unit: str = "MB") -> str:
    head = f"| {key} | T | {unit} | " + " | ".join(COLS) + " |\n|---|---|---|" + "---|" * len(COLS)
    return (ceilings_line(ceilings) + f"\n\nEach cell: GPU µs per call, {_UNITS[unit][2]}, % of read BW.\n\n"
            + head + "\n" + "\n".join(fmt_row(r, key, unit) for r in rows))
