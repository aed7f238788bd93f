"""Inputs and tolerances shared by the signal-pass tests (and the benchmarks' shapes).

Tolerance rule (STYLE.md habit 3): a backend's error against the float64 reference may be at most
twice the error of the same formulas run in torch float32 on the same inputs, plus a small atol
that covers the float32 rounding of results that torch happens to get exactly right.
"""

from __future__ import annotations

import numpy as np
import torch

from hitl_triage.kernels.signals import EnsembleSignals
from hitl_triage.kernels.signals.reference import ensemble_signals_reference

FLOAT_FIELDS = ("confidence", "margin", "total_entropy", "expected_entropy", "mutual_info")
ATOL = {"confidence": 2e-6, "margin": 4e-6, "total_entropy": 2e-5, "expected_entropy": 2e-5, "mutual_info": 4e-5}

# (B, M, C): one row, odd sizes, M=1, C=2, many members, large C (tiled), the benchmark shape.
SHAPES = [
    (1, 1, 2),
    (1, 5, 10),
    (3, 1, 2),
    (257, 5, 10),
    (64, 2, 3),
    (33, 64, 3),
    (129, 3, 100),
    (1823, 7, 781),
    (9, 2, 4097),
    (5, 3, 32768),
]


def make_logits(rng: np.random.Generator, shape, dtype: torch.dtype, degenerate: bool = True) -> torch.Tensor:
    """Random logits of ``shape`` with a spread of confidences; with ``degenerate``, the first
    rows are all-equal, NaN, +inf, -inf, ±1e4 and a near-tie, as far as the batch allows."""
    batch, members, classes = shape
    scale = rng.uniform(0.3, 6.0, size=(batch, 1, 1))
    z = rng.standard_normal(shape) * scale + rng.standard_normal((batch, 1, classes)) * scale
    if degenerate:
        specials = [
            lambda r: r.fill(0.75),                                         # all equal
            lambda r: r.__setitem__((0, classes // 2), np.nan),             # NaN
            lambda r: r.__setitem__((members - 1, 0), np.inf),              # +inf
            lambda r: r.__setitem__((0, classes - 1), -np.inf),             # -inf
            lambda r: r.__setitem__(slice(None), rng.choice([-1e4, 1e4], size=r.shape)),  # huge
            lambda r: r.__setitem__((slice(None), slice(0, 2)), 1e4),       # huge exact tie
        ]
        for row, special in zip(range(batch), specials):
            special(z[row])
    return torch.from_numpy(z).to(dtype)


def temperature_cases(rng: np.random.Generator, batch: int):
    """(temperature, temperature_index) pairs: a scalar, and a per-row table of 4 entries."""
    table = rng.uniform(0.25, 4.0, size=4).astype(np.float32)
    index = rng.integers(0, 4, size=batch).astype(np.int32)
    return [(1.7, None), (table, index)]


def torch_float32_signals(z: torch.Tensor, temps, index) -> EnsembleSignals:
    """The reference's formulas run in float32: the yardstick for the tolerance."""
    temps = torch.as_tensor(temps, dtype=torch.float32).reshape(-1)
    idx = torch.as_tensor(index).long() if index is not None else None
    out = _reference_at(z.float(), temps, idx, torch.float32)
    return out


def _reference_at(z, temps, idx, dtype):
    from hitl_triage.kernels.signals import reference

    t = temps[idx] if idx is not None else temps.expand(z.shape[0])
    valid = torch.isfinite(z).all(dim=(1, 2))
    z = torch.where(valid[:, None, None], z, torch.zeros((), dtype=dtype))
    member = torch.softmax(z / t[:, None, None].to(dtype), dim=2)
    p = member.mean(dim=1)
    top2 = torch.topk(p, k=2, dim=1).values
    total = reference._entropy(p)
    expected = reference._entropy(member).mean(dim=1)
    return {
        "confidence": top2[:, 0],
        "margin": top2[:, 0] - top2[:, 1],
        "total_entropy": total,
        "expected_entropy": expected,
        "mutual_info": torch.clamp(total - expected, min=0),
        "valid": valid,
    }


def assert_signals_match(got: EnsembleSignals, z: torch.Tensor, temps, index, label: str) -> None:
    """Compare ``got`` (any backend, any array type) with the float64 reference, verbosely."""
    temps_t = torch.as_tensor(np.asarray(temps, dtype=np.float32)).reshape(-1)
    index_t = torch.as_tensor(index) if index is not None else None
    ref = ensemble_signals_reference(z, temps_t, index_t)
    yard = torch_float32_signals(z, temps_t, index_t)
    got = got.map(lambda a: torch.as_tensor(np.asarray(a.cpu()) if isinstance(a, torch.Tensor) else np.asarray(a)))

    valid = ref.valid
    assert torch.equal(got.valid.bool(), valid), f"{label}: valid differs at rows {torch.nonzero(got.valid.bool() != valid).flatten()[:10].tolist()}"
    invalid = ~valid
    assert (got.predicted_class[invalid] == -1).all(), f"{label}: invalid rows must have predicted_class -1"
    for name in FLOAT_FIELDS + ("vote_agreement",):
        values = getattr(got, name)
        assert values.dtype == torch.float32, f"{label}: {name} dtype {values.dtype}, expected float32"
        assert torch.isnan(values[invalid]).all(), f"{label}: {name} must be NaN on invalid rows"

    for name in FLOAT_FIELDS:
        g = getattr(got, name)[valid].double()
        r = getattr(ref, name)[valid]
        y = yard[name][valid].double()
        yard_err = (y - r).abs().max().item() if r.numel() else 0.0
        tol = 2 * yard_err + ATOL[name]
        err = (g - r).abs()
        if r.numel() and err.max().item() > tol:
            worst = int(err.argmax())
            raise AssertionError(
                f"{label}: {name} max error {err.max().item():.3g} > tolerance {tol:.3g} "
                f"(torch float32 error {yard_err:.3g}); worst valid row {worst}: got {g[worst].item()!r}, "
                f"reference {r[worst].item()!r}; {(err > tol).sum().item()} rows off"
            )

    # The class (and so the vote) is only defined up to the float32 resolution of a near-tie.
    decided = valid & (ref.margin > 2 * ATOL["margin"] + 1e-6)
    wrong = decided & (got.predicted_class.long() != ref.predicted_class)
    assert not wrong.any(), (
        f"{label}: predicted_class differs on {int(wrong.sum())} decided rows, first at "
        f"{torch.nonzero(wrong)[0].item()}: got {got.predicted_class[wrong][0].item()}, "
        f"reference {ref.predicted_class[wrong][0].item()}"
    )
    vote_err = (got.vote_agreement[decided].double() - ref.vote_agreement[decided]).abs()
    assert vote_err.numel() == 0 or vote_err.max().item() < 1e-6, f"{label}: vote_agreement differs (max {vote_err.max().item()})"
