"""GPU timing shared by the benchmarks: CUDA-graph replay time per call, and the device-to-device
copy bandwidth measured in the same run (bytes read + bytes written)."""

from __future__ import annotations

import torch


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


def copy_bandwidth_tbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 4)
    return 2 * nbytes / (us * 1e-6) / 1e12


def input_sets(make, nbytes_per_set: int, min_total: int = 256 << 20, max_sets: int = 32):
    """Enough independent input sets that one pass over them exceeds L2 (50 MB on an H100)."""
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
    """One markdown row: ``r[key]``, T, size, and per column µs, rate and % of the copy bandwidth."""
    div, size_fmt, rate, rate_mul, rate_fmt = _UNITS[unit]
    cells = []
    for c in COLS:
        us = r[c]
        tbs = r["bytes"] / (us * 1e-6) / 1e12
        cells.append(f"{us:9.1f} µs {tbs * rate_mul:{rate_fmt}} {rate} {100 * tbs / r['copy_tbs']:3.0f}%")
    return f"| {r[key]} | {r['T']:5d} | {r['bytes'] / div:{size_fmt}} | " + " | ".join(cells) + " |"


def table(copy: float, rows: list, key: str, unit: str = "MB") -> str:
    head = f"| {key} | T | {unit} | " + " | ".join(COLS) + " |\n|---|---|---|" + "---|" * len(COLS)
    return f"copy bandwidth (same run): {copy:.2f} TB/s\n\n" + head + "\n" + "\n".join(
        fmt_row(r, key, unit) for r in rows)
