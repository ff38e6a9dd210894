"""What the kernel launchers ask about a CUDA device, answered once per device (cached: the ops ask
on every call and the answers never change), the E2M1 override both backends honour, and the
zero-at-rest counters of the kernels whose CTAs meet at a ticket."""

from __future__ import annotations

import functools
import os

import torch

E2M1_ENV = "DSV4_E2M1"  # "software" forces the software E2M1 conversion on every arch


def index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def capability(idx: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(idx)


@functools.lru_cache(maxsize=None)
def sm_count(idx: int) -> int:
    return torch.cuda.get_device_properties(idx).multi_processor_count


def software_e2m1_forced() -> bool:
    """``DSV4_E2M1=software`` (read on every call)."""
    return os.environ.get(E2M1_ENV, "").strip().lower() == "software"


_counters: dict = {}  # (owner, device) -> int32 counters every kernel of that owner leaves zero
_counters_held: list = []  # every buffer ever cached: a CUDA graph captured with one keeps using it


def zeroed_counters(device: torch.device, owner: str, n: int, size: int = 0) -> torch.Tensor:
    """int32 ticket counters, at least ``n`` (``max(n, size)`` when created), zero: every kernel of
    ``owner`` (split-K GEMM tiles, top-k merge groups) counts its CTAs' arrivals and the last one
    resets the count. One buffer per (owner, device), created at the first call outside a CUDA-graph
    capture (the runner's and Inductor's warm-up runs come first) and replaced by a larger one when a
    call needs more, the old one kept alive for graphs captured with it. A call captured before one
    large enough exists gets fresh zeros of its own (a memset in its graph), never cached: memory
    allocated inside a capture is not zero at capture time. Two kernels of one owner running at the
    same time on two streams of one device would share the counters: unsupported."""
    key = (owner, str(device))
    buf = _counters.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    buf = _counters[key] = torch.zeros(max(n, size), dtype=torch.int32, device=device)
    _counters_held.append(buf)
    return buf
