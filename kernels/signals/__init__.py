"""Ensemble signals: one fused pass over the logits of an ensemble.

Public: :func:`ensemble_signals` and its result :class:`EnsembleSignals`. The float64 reference
in :mod:`.reference` is the spec; ``numba`` (CPU) and ``triton`` (CUDA) are the fast backends.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Generic, TypeVar

import numpy as np
import torch

from .._arrays import as_tensor, device_kind, returns_numpy, to_caller
from .._dispatch import Backend, PassRegistry, cpu_and_cuda, cpu_only, triton_devices

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The array type of the fields: torch.Tensor for tensor input, np.ndarray for numpy input.
ArrayT = TypeVar("ArrayT")


@dataclasses.dataclass
class EnsembleSignals(Generic[ArrayT]):
    """Per-row signals, each of length B, on the input's device (numpy in, numpy out).

    ``predicted_class`` int32 (-1 where invalid); the rest float32 (NaN where invalid) except
    ``valid`` (bool). Entropies are in nats. See :mod:`hitl_triage.kernels.signals.reference`
    for the exact definitions.
    """

    predicted_class: ArrayT
    confidence: ArrayT
    margin: ArrayT
    total_entropy: ArrayT
    expected_entropy: ArrayT
    mutual_info: ArrayT
    vote_agreement: ArrayT
    valid: ArrayT

    FIELDS = (
        "predicted_class", "confidence", "margin", "total_entropy",
        "expected_entropy", "mutual_info", "vote_agreement", "valid",
    )

    def map(self, fn) -> "EnsembleSignals":
        """Apply ``fn`` to every field and return the new result."""
        return EnsembleSignals(**{name: fn(getattr(self, name)) for name in self.FIELDS})


REGISTRY = PassRegistry(
    pass_name="signals",
    backends={
        "numba": Backend("numba", f"{__name__}.numba_cpu", "ensemble_signals_numba", cpu_only),
        "triton": Backend("triton", f"{__name__}.triton_gpu", "ensemble_signals_triton", triton_devices),
        "reference": Backend("reference", f"{__name__}.reference", "ensemble_signals_backend", cpu_and_cuda),
    },
    preference={"cpu": ("numba", "reference"), "cuda": ("triton", "reference")},
)


def ensemble_signals(logits, temperature=1.0, *, temperature_index=None, backend: str | None = None) -> EnsembleSignals:
    """Calibrated confidence, margin, entropies, mutual information and vote agreement per row.

    Args:
        logits: [B, M, C] raw logits of M ensemble members over C classes (a [B, C] input means
            M = 1); float16, bfloat16, float32 or float64; numpy, torch (CPU or CUDA) or DLPack.
        temperature: a positive scalar, or a table [K] of positive temperatures of which row b
            uses ``temperature[temperature_index[b]]`` (per-source temperatures at no cost).
        temperature_index: int [B] indices into the table, required when the table has K > 1.
        backend: "numba", "triton" or "reference"; default from HITL_TRIAGE_SIGNALS_BACKEND,
            else chosen by the input's device.

    Rows holding NaN or ±inf come back with ``valid=False``, ``predicted_class=-1`` and NaN
    signals, so they can never look confident.
    """
    numpy_out = returns_numpy(logits)
    z = as_tensor(logits, "logits")
    if z.ndim == 2:
        z = z.unsqueeze(1)
    if z.ndim != 3:
        raise ValueError(f"logits: expected shape [B, M, C] (or [B, C]), found {tuple(z.shape)}")
    if z.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits: expected float16, bfloat16, float32 or float64, found {z.dtype}")
    batch, members, classes = z.shape
    if members < 1:
        raise ValueError(f"logits: expected at least 1 ensemble member, found M={members}")
    if classes < 2:
        raise ValueError(f"logits: expected at least 2 classes, found C={classes}")
    temps, index = _temperature_table(temperature, temperature_index, batch, z.device)
    name, impl = REGISTRY.resolve(device_kind(z), backend)
    if batch == 0:
        out = _empty(z.device)
    else:
        out = impl(z.contiguous(), temps, index)
    out = out.map(_as_output_dtype)
    return out.map(lambda t: to_caller(t, numpy_out))


def prepare_signals(members: int, classes: int, device="cpu", *, backend: str | None = None) -> str:
    """Compile (or load from disk caches) what will serve [B, members, classes] logits on
    ``device``, so that no batch pays for it; returns the backend's name. A server calls this
    when it loads a profile (the numba kernel specialised for C takes seconds to compile cold)."""
    device = torch.device(device)
    name, impl = REGISTRY.resolve(device.type, backend)
    warm = getattr(sys.modules[impl.__module__], "precompile", None)
    if warm is not None:
        warm(members, classes)
    else:  # JIT backends compile on their first call
        ensemble_signals(torch.zeros((1, members, classes), device=device), 1.0, backend=name)
    return name


def _as_output_dtype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    if t.dtype.is_floating_point:
        return t.to(torch.float32)
    return t.to(torch.int32)


def _empty(device) -> EnsembleSignals:
    f = torch.empty(0, dtype=torch.float32, device=device)
    return EnsembleSignals(
        predicted_class=torch.empty(0, dtype=torch.int32, device=device),
        confidence=f, margin=f, total_entropy=f, expected_entropy=f, mutual_info=f,
        vote_agreement=f, valid=torch.empty(0, dtype=torch.bool, device=device),
    )


def _temperature_table(temperature, temperature_index, batch: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the temperature argument; return a float32 table [K] and int32 indices [B] or None."""
    if isinstance(temperature, (int, float, np.floating, np.integer)):
        temps = torch.tensor([float(temperature)], dtype=torch.float32)
    else:
        temps = as_tensor(temperature, "temperature").detach().to("cpu", torch.float32).reshape(-1)
    if temps.numel() == 0:
        raise ValueError("temperature: expected a scalar or a non-empty table, found an empty array")
    bad = ~(torch.isfinite(temps) & (temps > 0))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"temperature: expected positive finite values, found {float(temps[first])} at index {first}"
        )
    temps = temps.to(device)
    if temperature_index is None:
        if temps.numel() != 1:
            raise ValueError(
                f"temperature_index: required with a table of {temps.numel()} temperatures, found None"
            )
        return temps, None
    index = as_tensor(temperature_index, "temperature_index")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"temperature_index: expected integers, found {index.dtype}")
    if index.shape != (batch,):
        raise ValueError(f"temperature_index: expected shape ({batch},), found {tuple(index.shape)}")
    index = index.to(device=device, dtype=torch.int32)
    if batch:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= temps.numel():
            raise ValueError(
                f"temperature_index: expected values in [0, {temps.numel()}), found range [{lo}, {hi}]"
            )
    return temps, index.contiguous()


__all__ = ["EnsembleSignals", "REGISTRY", "ensemble_signals", "prepare_signals"]
