"""What the kernel launchers ask about a CUDA device, answered once per device (cached: the ops ask
on every call and the answers never change), and the E2M1 override both backends honour."""

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
