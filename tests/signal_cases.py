"""Inputs and tolerances shared by the signal-pass tests (and the benchmarks' shapes).

Tolerance rule (STYLE.md habit 3), per element and per field, against the float64 reference r:

    |got - r| <= 2 |torch32 - r| + ULPS(field, M) * spacing32(scale)

torch32 is the same formulas run in torch float32 on the same inputs (the yardstick): twice its
error on that element, plus a few float32 ulps, because a correct kernel rounds differently from
torch and the yardstick is sometimes exact where the kernel is off by its last bits. The ulps are
of the values the result is computed from, not of the result: the confidence for confidence and
margin (a difference of two probabilities <= the top one), max(value, 1) for the entropies (sums
of O(1) terms such as log s_m with s_m >= 1, whose rounding stays ~ulp(1) even when the entropy
is near 0), max(total, expected, 1) for the mutual information (their difference). On top, a
bias check: the mean signed error over the valid rows of one call may not exceed twice the
yardstick's plus a quarter ulp plus its standard error, so that a wrong rounding that shifts every
row by an ulp or two (under the per-element bound) still fails. Measured, numba and the Triton
interpreter on SHAPES x 4 dtypes x 2 temperature cases x several seeds: at most 3 ulps over twice
the yardstick for the entropies, 5 for the mutual information (at M = 64), 4 for confidence / margin at M <= 7,
7 for the margin at M = 64 (means of 64 float32 terms, summed in another order than torch's).
"""

from __future__ import annotations

import numpy as np
import torch

from hitl_triage.kernels.signals import EnsembleSignals
from hitl_triage.kernels.signals.reference import ensemble_signals_reference

FLOAT_FIELDS = ("confidence", "margin", "total_entropy", "expected_entropy", "mutual_info")


def ulps(name: str, members: int) -> float:
    """Float32 ulps allowed over twice the yardstick's error (measured maxima in the docstring):
    the probabilities are means of M members, whose summation error grows like sqrt(M), and the
    margin carries the errors of two of them."""
    per_probability = 3.0 + members ** 0.5 / 2
    if name == "confidence":
        return per_probability
    if name == "margin":
        return 2 * per_probability
    if name == "mutual_info":
        return 8.0  # the errors of both entropies
    return 4.0


def _scale(name: str, ref) -> torch.Tensor:
    """The magnitude whose float32 ulp sets the rounding of ``name`` (see the module docstring)."""
    if name in ("confidence", "margin"):
        return ref.confidence.abs()
    one = torch.ones_like(ref.total_entropy)
    if name == "mutual_info":
        return torch.maximum(torch.maximum(ref.total_entropy, ref.expected_entropy), one)
    return torch.maximum(getattr(ref, name).abs(), one)


def spacing32(x: torch.Tensor) -> torch.Tensor:
    """float32 ulp at |x| (np.spacing of the float32 value), as float64."""
    return torch.from_numpy(np.spacing(np.abs(x.cpu().numpy()).astype(np.float32)).astype(np.float64))

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


def assert_signals_match(got: EnsembleSignals, z: torch.Tensor, temps, index, label: str,
                         float32_class_sums: bool = False) -> None:
    """Compare ``got`` (any backend, any array type) with the float64 reference, verbosely.

    ``float32_class_sums``: the kernel sums over the C classes one term at a time in float32 (the
    blocked numba kernel forced past its class range), whose error grows with C where torch's
    pairwise sums do not: (C - 1) / 4 ulps more, half the worst-case recursive-summation bound
    (measured: 17 ulps at C = 130, on the uniform row)."""
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

    members = z.shape[1] if z.dim() == 3 else 1
    for name in FLOAT_FIELDS:
        g = getattr(got, name)[valid].double()
        r = getattr(ref, name)[valid]
        if not r.numel():
            continue
        y = yard[name][valid].double()
        yard_err = (y - r).abs()
        ulp = spacing32(_scale(name, ref)[valid])
        extra = (z.shape[-1] - 1) / 4 if float32_class_sums else 0.0
        tol = 2 * yard_err + (ulps(name, members) + extra) * ulp
        err = (g - r).abs()
        _report(label, name, err, yard_err, ulp, tol)
        off = err > tol
        if off.any():
            worst = int((err / tol).argmax())
            raise AssertionError(
                f"{label}: {name} error {err[worst].item():.3g} > tolerance {tol[worst].item():.3g} at valid row "
                f"{worst} (torch float32 error there {yard_err[worst].item():.3g}, float32 ulp "
                f"{ulp[worst].item():.3g}): got {g[worst].item()!r}, reference {r[worst].item()!r}; "
                f"{int(off.sum())} of {r.numel()} rows off; max error {err.max().item():.3g}"
            )
        # A correct kernel's rounding errors are (nearly) unbiased, so their mean shrinks with the
        # row count; a systematic one-ulp slip in every row does not. A quarter ulp covers the
        # slight bias of float32 polynomials; 4 standard errors the rest.
        n = r.numel()
        bias, yard_bias = (g - r).mean().abs().item(), (y - r).mean().abs().item()
        bias_tol = 2 * yard_bias + ulp.mean().item() * (0.25 + (4 + extra) / n ** 0.5)
        if bias > bias_tol:
            raise AssertionError(
                f"{label}: {name} mean signed error {bias:.3g} over {n} rows > {bias_tol:.3g} "
                f"(torch float32's {yard_bias:.3g}, mean float32 ulp {ulp.mean().item():.3g}): a systematic bias"
            )

    # The class (and so the vote) is only defined up to the float32 resolution of a near-tie.
    # 1e-5 is about 80 float32 ulps of a probability: far above any backend's margin error.
    decided = valid & (ref.margin > 1e-5)
    wrong = decided & (got.predicted_class.long() != ref.predicted_class)
    assert not wrong.any(), (
        f"{label}: predicted_class differs on {int(wrong.sum())} decided rows, first at "
        f"{torch.nonzero(wrong)[0].item()}: got {got.predicted_class[wrong][0].item()}, "
        f"reference {ref.predicted_class[wrong][0].item()}"
    )
    vote_err = (got.vote_agreement[decided].double() - ref.vote_agreement[decided]).abs()
    assert vote_err.numel() == 0 or vote_err.max().item() < 1e-6, f"{label}: vote_agreement differs (max {vote_err.max().item()})"


def _report(label, name, err, yard_err, ulp, tol) -> None:
    """With SIGNAL_TOL_REPORT=path, append one line per check (for measuring the bound)."""
    import os

    path = os.environ.get("SIGNAL_TOL_REPORT")
    if path:
        with open(path, "a") as f:
            excess = ((err - 2 * yard_err) / ulp).max().item()
            f.write(f"{label}\t{name}\t{err.max().item():.3e}\t{(err / tol).max().item():.3f}\t{excess:.2f}\n")
