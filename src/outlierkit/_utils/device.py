"""Device and dtype resolution with the defaults outlierkit documents (fp32 on CPU, bf16 on GPU)."""

from __future__ import annotations

import torch

from outlierkit.errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; an unavailable device is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> fp32 on CPU, bf16 on GPU; names like ``bf16``/``float16`` map to torch dtypes."""
    if name in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; valid: {sorted(set(_DTYPES))}") from None


def sequential_dtype(name: str | None, compute: torch.device) -> str | None:
    """The dtype to load a model in for sequential execution: it is loaded on the CPU but computes on
    ``compute``, so the default follows the compute device (bf16 for a GPU), not the CPU's fp32 (which
    would double a 70B model's host memory and every weight transfer)."""
    if name not in (None, "", "auto"):
        return name
    return "fp32" if compute.type == "cpu" else "bf16"


def placement(device: str | None, dtype: str | None, sequential: bool) -> tuple[str | None, str | None, str | None]:
    """Where and how a command loads its model: ``(load device, load dtype, compute device)``. Sequential
    runs load into CPU memory (in :func:`sequential_dtype`) and compute on ``device`` one layer at a time;
    otherwise the model loads on ``device`` as given and the compute device is None (the model's own)."""
    if not sequential:
        return device, dtype, None
    compute = resolve_device(device)
    return "cpu", sequential_dtype(dtype, compute), str(compute)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
