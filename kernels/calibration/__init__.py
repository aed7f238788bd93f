"""Calibration pass: the float64 per-row work of temperature scaling an ensemble.

Public: :func:`nll_derivative_sums` (the NLL of the labels and its first two derivatives in the
inverse temperature, as sums over rows: what a Newton step of the temperature fit needs) and
:func:`row_statistics` (confidence, predicted class, log p(y), Brier term and validity of the
ensemble-mean prediction per row: what the calibration metrics are made of). The fitting itself
(grid, Newton, metrics, per-source temperatures) is ``hitl_triage.engine.calibration``.

The float64 torch code in :mod:`.reference` is the spec; ``numba`` (CPU, multi-threaded) is the fast
backend. Backend choice as for every pass (``kernels._dispatch``): the ``backend=`` argument, else
HITL_TRIAGE_CALIBRATION_BACKEND, else numba with a logged fallback to the reference.

There is no Triton backend on purpose: this is a fit-time pass, run a few dozen times over the
labelled rows when a profile is fitted, in float64 (slow on most GPUs), and the fit is a sequential
Newton loop whose every step needs the full sums back on the host. Serving-time calibrated signals
come from the signals pass, which has one. Inputs on a CUDA device are refused; move them first.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from .._arrays import device_kind
from .._dispatch import Backend, PassRegistry, cpu_only


class CalibrationKernels(NamedTuple):
    """What a backend module registers: its two functions, called on checked inputs (C-contiguous
    float32/float64 logits [N, M, C], int64 labels [N] in [0, C), float64 inverse temperatures)."""

    nll_derivative_sums: Callable
    row_statistics: Callable


class RowStatistics(NamedTuple):
    """Per-row statistics of the ensemble-mean prediction p, each a numpy array [N].

    ``confidence`` max_c p (float64); ``predicted`` argmax_c p, lowest index on ties (int64);
    ``log_py`` log p[y] in nats, computed in log space (float64); ``brier`` sum_c (p_c - 1[c = y])^2
    (float64, in [0, 2]); ``valid`` False for a row holding a NaN or inf logit, whose other fields
    are then NaN and -1.
    """

    confidence: np.ndarray
    predicted: np.ndarray
    log_py: np.ndarray
    brier: np.ndarray
    valid: np.ndarray


REGISTRY = PassRegistry(
    pass_name="calibration",
    backends={
        "numba": Backend("numba", f"{__name__}.numba_cpu", "KERNELS", cpu_only),
        "reference": Backend("reference", f"{__name__}.reference", "KERNELS", cpu_only),
    },
    preference={"cpu": ("numba", "reference")},
)


def nll_derivative_sums(logits, labels, beta: float, *, backend: str | None = None) -> np.ndarray:
    """Sums over rows of log S_i, S_i'/S_i and (S_i'/S_i)' at inverse temperature ``beta`` = 1/T.

    S_i(beta) = sum_m softmax(beta * z[i, m])[y_i] (a sum over members, not a mean) and ' is
    d/d beta, so the mean NLL of the labels is log M - sums[0] / N, its derivative in beta
    -sums[1] / N and its second derivative -sums[2] / N. Formulas in
    :func:`.reference.nll_derivative_sums_reference`.

    Args:
        logits: [N, M, C] (or [N, C] for M = 1), float16/32/64 numpy or CPU torch (bfloat16 too);
            every row finite (this is not checked: the caller removes non-finite rows first,
            with :func:`row_statistics`'s ``valid``).
        labels: integer [N] in [0, C).
        beta: positive finite inverse temperature.
        backend: "numba" or "reference"; default from HITL_TRIAGE_CALIBRATION_BACKEND.

    Returns:
        float64 [3]; zeros for N = 0. The numba backend adds fixed chunks of rows in order, so
        the result does not depend on the thread count.
    """
    impl = _resolve(logits, backend)
    z = check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[2])
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: expected a positive finite inverse temperature, found {beta}")
    return impl.nll_derivative_sums(z, y, beta)


def row_statistics(logits, labels, betas=1.0, *, backend: str | None = None) -> RowStatistics:
    """Confidence, predicted class, log p(y), Brier term and validity of the ensemble mean
    p_i = (1/M) sum_m softmax(betas[i] * z[i, m]) of every row (see :class:`RowStatistics`).

    Args:
        logits: [N, M, C] (or [N, C] for M = 1), float16/32/64 numpy or CPU torch (bfloat16 too);
            rows holding NaN or inf come back with ``valid=False``.
        labels: integer [N] in [0, C).
        betas: inverse temperatures 1/T, a positive scalar or float [N] (one per row).
        backend: "numba" or "reference"; default from HITL_TRIAGE_CALIBRATION_BACKEND.
    """
    impl = _resolve(logits, backend)
    z = check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[2])
    b = _check_betas(betas, z.shape[0])
    return RowStatistics(*impl.row_statistics(z, y, b))


# ------------------------------------------------------------------------------------------------
# The boundary: one backend, numpy arrays of the dtypes the kernels are compiled for.


def _resolve(logits, backend: str | None) -> CalibrationKernels:
    _, impl = REGISTRY.resolve(device_kind(logits), backend)
    return impl


def as_numpy(x, name: str) -> np.ndarray:
    """A numpy view of a numpy array, a CPU torch tensor (half precision widened, exactly) or a
    DLPack array; a tensor on another device is refused with the field named."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: the calibration pass runs on the CPU, found a tensor on {x.device}")
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.to(torch.float32)  # exact
        return x.numpy()
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
        return as_numpy(torch.from_dlpack(x), name)
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with the field named
        raise TypeError(f"{name}: expected a numpy array or torch tensor, found {type(x).__name__}") from exc


def check_logits(logits, name: str = "logits") -> np.ndarray:
    """C-contiguous float32 or float64 [N, M, C] ([N, C] means M = 1; float16 widened to
    float32, exactly; wider floats narrowed to float64)."""
    z = as_numpy(logits, name)
    if z.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, found dtype {z.dtype}")
    if z.ndim == 2:
        z = z[:, None, :]
    if z.ndim != 3:
        raise ValueError(f"{name}: expected shape [N, M, C] (or [N, C]), found {z.shape}")
    if z.shape[1] < 1:
        raise ValueError(f"{name}: expected at least 1 ensemble member, found M={z.shape[1]}")
    if z.shape[2] < 2:
        raise ValueError(f"{name}: expected at least 2 classes, found C={z.shape[2]}")
    if z.dtype == np.float16:
        z = z.astype(np.float32)
    elif z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)
    return np.ascontiguousarray(z)


def check_labels(labels, rows: int, classes: int) -> np.ndarray:
    """int64 [rows] class indices in [0, classes)."""
    y = as_numpy(labels, "labels")
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels: expected integer class indices, found dtype {y.dtype}")
    if y.shape != (rows,):
        raise ValueError(f"labels: expected shape ({rows},) to match the predictions, found {y.shape}")
    if rows:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"labels: expected values in [0, {classes}) (drop unknown labels first), found range [{lo}, {hi}]"
            )
    return np.ascontiguousarray(y, dtype=np.int64)


def _check_betas(betas, rows: int) -> np.ndarray:
    b = np.asarray(as_numpy(betas, "betas"), dtype=np.float64)
    if b.ndim == 0:
        b = np.full(rows, float(b))
    elif b.shape != (rows,):
        raise ValueError(f"betas: expected a scalar or one per row ({rows},), found shape {b.shape}")
    bad = ~(np.isfinite(b) & (b > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"betas: expected positive finite inverse temperatures, found {b[first]} at row {first}")
    return np.ascontiguousarray(b)


__all__ = [
    "REGISTRY", "CalibrationKernels", "RowStatistics", "as_numpy", "check_labels", "check_logits",
    "nll_derivative_sums", "row_statistics",
]
