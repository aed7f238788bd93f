"""Array plumbing shared by the passes: device kind, zero-copy conversion to torch and back."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def device_kind(x) -> str:
    """"cuda" for a tensor on an NVIDIA GPU (torch, or anything exporting DLPack on CUDA), else "cpu"."""
    if isinstance(x, torch.Tensor):
        return "cuda" if x.is_cuda else "cpu"
    if isinstance(x, np.ndarray):
        return "cpu"
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None:
        # DLPack device type 2 is kDLCUDA, 3 kDLCUDAHost (pinned host memory, still the CPU).
        return "cuda" if dlpack_device()[0] == 2 else "cpu"
    return "cpu"


def as_tensor(x, name: str) -> torch.Tensor:
    """View ``x`` (numpy, torch, CuPy or any DLPack exporter) as a torch tensor without copying."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a numeric array, found dtype {x.dtype}")
        if not x.flags.writeable:
            # Arrow hands out read-only views; the passes never write into their inputs, so the
            # view is shared as is (torch only warns that writing would be undefined).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x)
        return torch.from_numpy(x)
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # noqa: BLE001 - re-raised with the field named
        raise TypeError(
            f"{name}: expected a numpy array, torch tensor or DLPack array, found {type(x).__name__}"
        ) from exc


def returns_numpy(x) -> bool:
    """True when the caller passed numpy (or a list), so results should come back as numpy."""
    return isinstance(x, np.ndarray) or not (isinstance(x, torch.Tensor) or hasattr(x, "__dlpack__"))


def to_caller(t: torch.Tensor, numpy_out: bool):
    """Hand a result back in the caller's array type (numpy in, numpy out)."""
    return t.numpy() if numpy_out else t
