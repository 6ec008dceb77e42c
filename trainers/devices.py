"""Device selection and mixed precision for the trainers.

``resolve_device("auto")`` picks the accelerator when there is one (under ``torchrun``, the process's
``LOCAL_RANK``-th GPU), the CPU otherwise; ``resolve_device(None, network)`` keeps the network where it is. ``precision`` is ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``:
the forward and loss run under ``torch.autocast`` in that dtype, and fp16 scales the loss with a ``GradScaler``.
bf16 autocast works on the CPU too.
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
import torch.nn as nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: torch.device | str | None = None, network: nn.Module | None = None) -> torch.device:
    """``device`` as a ``torch.device``. ``None`` means where ``network``'s first parameter or buffer is (the CPU
    without one); ``"auto"`` picks CUDA (``cuda:LOCAL_RANK`` under torchrun), then Apple's MPS, then the CPU.
    Asking for an accelerator that is not there is an error."""
    if device is None:
        tensors = [*network.parameters(), *network.buffers()] if network is not None else []
        return tensors[0].device if tensors else torch.device("cpu")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu' or None")
    return device


def check_precision(precision: str | None) -> str:
    """``precision`` checked against :data:`PRECISIONS` (``None`` means ``"fp32"``)."""
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The autocast context for ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 have fp32's exponent range and need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
