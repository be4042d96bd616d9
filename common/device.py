"""Where a model runs: `ModelConfig.device` / `ModelConfig.dtype` resolved to torch objects.

One rule for the actor's HF engine and the learner: `device='auto'` is CUDA when available,
else CPU; `dtype='auto'` is bfloat16 on CUDA and float32 on CPU; `device='cuda'` without CUDA
raises `DeviceError` (saying the fix). `gpu_uuid` names the GPU a process computes on, for the
weight sync's backend choice. Only torch processes import this module (the HF engine, the
learner, the actor), so it imports torch at the top.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import torch

from common.errors import DeviceError  # defined with its exit code there; callers import it from here too

if TYPE_CHECKING:  # pragma: no cover
    from common.config import ModelConfig

# ModelConfig.dtype -> attribute of torch
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_device_dtype(model_cfg: ModelConfig,
                         local_rank: int | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for `model_cfg`; on CUDA the device is `cuda:local_rank` (None: `cuda`)."""
    if model_cfg.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("model.device='cuda' but CUDA is not available: set model.device=cpu or auto")
    use_cuda = model_cfg.device == "cuda" or (model_cfg.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda" if local_rank is None else f"cuda:{int(local_rank)}")
    if model_cfg.dtype == "auto":
        return device, torch.bfloat16 if use_cuda else torch.float32
    return device, getattr(torch, _TORCH_DTYPES[model_cfg.dtype])


def gpu_uuid(device: torch.device) -> str:
    """The UUID of the CUDA device `device` as nvidia-smi spells it ('GPU-8-4-4-4-12 hex'); "" for
    a device that is not CUDA, without touching CUDA (a CPU run never initialises it)."""
    if device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch.cuda.get_device_properties(index), "uuid", None)  # absent in some builds: unknown
    return f"GPU-{uuid.UUID(bytes=bytes(raw.bytes))}" if raw is not None else ""
