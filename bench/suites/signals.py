"""signals: the fused ensemble-signal pass, every available backend of ours against a
straightforward vectorised numpy version, torch eager (same formulas) and torch.compile.

Per case: predictions (rows) per second, best of 5 after a warm-up; the speed-up against numpy
and torch eager of the same run; GB/s and % of the memory roof measured in the same run, where
the pass's bytes are the logits read once plus the outputs written once (4 bytes of
predicted_class, six float32 signals, one byte of validity per row); and, as a guard against a
fast but wrong pass, the largest error of confidence, margin and mutual information on the first
2,048 rows against the float64 reference (the spec).

Cases (CPU): the headline M=5, C=10, float32, 1M rows; batch sizes 1k..1M at that shape (the
plot); M in {1, 5, 10} x C in {10, 1000} (rows lowered so one input stays within a memory cap);
float16. On CUDA: the same timed with CUDA events against the device-to-device copy, 10M rows at
M=5/C=10 in float16 and float32, M=1/C=1000, M=10/C=32768.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import peers
from ..factories import make_logits, make_logits_torch, rows_for
from ..report import Row
from ..runner import NotAvailableYet
from .common import device_roofline, failure, host_roofline, not_yet, time_call

SUITE = "signals"
TABLE_QUALITY = ("GB/s", "max_err")  # the rest (per-field errors, class mismatches) is in the JSON
TABLE_HIDE = ("best s",)
TEMPERATURE = 1.5
OUTPUT_BYTES_PER_ROW = 4 + 6 * 4 + 1
QUALITY_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: int
    members: int
    classes: int
    dtype: str
    compile: bool = False  # also measure torch.compile here (each shape compiles anew)

    @property
    def logit_bytes(self) -> int:
        return self.rows * self.members * self.classes * np.dtype(self.dtype).itemsize

    @property
    def pass_bytes(self) -> int:
        return self.logit_bytes + self.rows * OUTPUT_BYTES_PER_ROW

    def sizes(self) -> dict:
        return {"B": self.rows, "M": self.members, "C": self.classes}


def cpu_cases(quick: bool) -> list[Case]:
    headline = Case("headline", 1_000_000, 5, 10, "float32", compile=True)
    batches = [1_000, 10_000, 100_000] if quick else [1_000, 3_000, 10_000, 30_000, 100_000, 300_000]
    cap = 10_000_000 if quick else 50_000_000  # elements per shape-sweep input (40 / 200 MB float32)
    cases = [headline] + [Case("batch sweep", b, 5, 10, "float32") for b in batches]
    for members in (1, 5, 10):
        for classes in (10, 1000):
            if (members, classes) != (5, 10):
                cases.append(Case("shape sweep", rows_for(members, classes, 1_000_000, cap), members, classes, "float32"))
    cases.append(Case("float16", 300_000 if quick else 1_000_000, 5, 10, "float16", compile=not quick))
    if not quick:
        cases.append(Case("float16", rows_for(10, 1000, 1_000_000, cap), 10, 1000, "float16"))
    return cases


def cuda_cases(quick: bool) -> list[Case]:
    rows = 10_000_000
    cases = [
        Case("cuda headline", rows, 5, 10, "float32", compile=True),
        Case("cuda headline", rows, 5, 10, "float16", compile=True),
    ]
    for dtype in ("float32", "float16"):
        cases.append(Case("cuda large C", rows_for(1, 1000, 4_000_000, 400_000_000), 1, 1000, dtype, compile=not quick))
        cases.append(Case("cuda large C", rows_for(10, 32768, 10_000, 400_000_000), 10, 32768, dtype, compile=not quick))
    return cases


def run(ctx) -> None:
    try:
        from hitl_triage.kernels.signals import REGISTRY, ensemble_signals  # noqa: F401
    except ImportError as exc:
        raise NotAvailableYet(f"hitl_triage.kernels.signals: {exc}") from exc
    cases = cpu_cases(ctx.quick)
    if ctx.quick:
        ctx.note(
            "quick mode: shape sweep capped at 10M logits per input, float16 at 300k rows, torch.compile "
            "and the float64 reference backend at the headline shape only"
        )
    _run_device(ctx, "cpu", cases)
    if ctx.cuda:
        _run_device(ctx, "cuda", cuda_cases(ctx.quick))
    _plot(ctx)


def _ours(device: str):
    """(label, backend name or None, status) for every registered backend on ``device``."""
    from hitl_triage.kernels._dispatch import triton_interpreting
    from hitl_triage.kernels.signals import REGISTRY

    available = REGISTRY.available(device)
    out = []
    for name in REGISTRY.backends:
        label = f"ours: {name}"
        if name == "triton" and device == "cpu" and triton_interpreting():
            out.append((label, None, "skipped: Triton's interpreter (TRITON_INTERPRET=1) is a test tool, not timed"))
        elif name in available:
            out.append((label, name, "ok"))
        else:
            out.append((label, None, _why_unavailable(name, device)))
    return out


def _why_unavailable(name: str, device: str) -> str:
    """The dispatcher's own reason, from asking it for the backend on a tiny input."""
    import torch

    from hitl_triage.kernels import BackendUnavailable, ensemble_signals

    try:
        ensemble_signals(torch.zeros((1, 1, 2), device=device), 1.0, backend=name)
    except BackendUnavailable as exc:
        # A backend for another device (Triton on a machine without a GPU) is not missing work.
        return f"{'skipped' if 'cannot serve' in str(exc) else 'not available yet'}: {exc}"
    except Exception as exc:  # noqa: BLE001
        return not_yet(exc)
    return "not available yet: listed as unavailable by the dispatcher"


def _implementations(ctx, device: str, case: Case):
    """(label, callable(z) or None, status) in table order: baselines first, then ours."""
    import torch

    from hitl_triage.kernels.signals import ensemble_signals

    impls = []
    if device == "cpu":
        impls.append(("numpy", lambda z: peers.numpy_signals(z, TEMPERATURE), "ok"))

        def eager(z):
            return peers.torch_signals(torch.from_numpy(z), TEMPERATURE)
    else:
        def eager(z):
            return peers.torch_signals(z, TEMPERATURE)
    impls.append(("torch eager", eager, "ok"))
    if case.compile:
        compiled = torch.compile(peers.torch_signals, dynamic=False)
        if device == "cpu":
            impls.append(("torch.compile", lambda z: compiled(torch.from_numpy(z), TEMPERATURE), "ok"))
        else:
            impls.append(("torch.compile", lambda z: compiled(z, TEMPERATURE), "ok"))
    for label, backend, status in _ours(device):
        if backend == "reference" and ctx.quick and "headline" not in case.name:
            continue  # the float64 spec is slow by design; quick mode times it at the headline only
        if backend is None:
            impls.append((label, None, status))
        else:
            impls.append((label, (lambda b: lambda z: ensemble_signals(z, TEMPERATURE, backend=b))(backend), "ok"))
    return impls


def _as_numpy(out, field: str, n: int) -> np.ndarray:
    value = out[field] if isinstance(out, dict) else getattr(out, field)
    if hasattr(value, "detach"):
        value = value[:n].detach().cpu().numpy()
    return np.asarray(value[:n], dtype=np.float64)


def _reference(z, device: str):
    import torch

    from hitl_triage.kernels.signals.reference import ensemble_signals_reference

    head = z[:QUALITY_ROWS]
    head = torch.from_numpy(np.ascontiguousarray(head)) if device == "cpu" else head.cpu()
    return ensemble_signals_reference(head, torch.tensor([TEMPERATURE]), None)


def _quality(out, ref) -> dict:
    """Largest absolute error against the float64 spec on the first rows, and wrong classes."""
    n = int(ref.valid.shape[0])
    q = {}
    for field, key in (("confidence", "err_conf"), ("margin", "err_margin"), ("mutual_info", "err_mi")):
        got = _as_numpy(out, field, n)
        q[key] = float(np.nanmax(np.abs(got - getattr(ref, field).numpy()))) if n else 0.0
    got_class = _as_numpy(out, "predicted_class", n)
    # Near-ties may flip in float32/float16; more than a handful means a wrong pass.
    return {
        "max_err": max(q.values()),
        **q,
        "class_mismatch": int((got_class != ref.predicted_class.numpy()).sum()),
    }


def _run_device(ctx, device: str, cases: list[Case]) -> None:
    cuda = device == "cuda"
    roof = device_roofline(ctx) if cuda else host_roofline(ctx)
    unavailable_reported = set()
    task = ctx.task(f"{SUITE} ({device})", total=len(cases))
    for case in cases:
        ctx.progress.update(task, description=f"{SUITE} ({device}): {case.name} {case.sizes()} {case.dtype}")
        if cuda:
            z = make_logits_torch(case.rows, case.members, case.classes, case.dtype, device="cuda", seed=ctx.seed)
        else:
            z = make_logits(case.rows, case.members, case.classes, case.dtype, seed=ctx.seed)
        ref = _reference(z, device)
        rows = []
        for label, fn, status in _implementations(ctx, device, case):
            if fn is None:
                # A backend that is not there is said once per device, not once per case.
                if label not in unavailable_reported:
                    unavailable_reported.add(label)
                    rows.append(Row(SUITE, "all cases" if device == "cpu" else "all cuda cases", label,
                                    {"device": device}, status=status))
                continue
            rows.append(_measure_one(ctx, case, label, fn, z, ref, roof, cuda))
        _ratios(rows)
        for r in rows:
            ctx.add(r)
        del z
        ctx.advance(task)
    ctx.progress.remove_task(task)


def _measure_one(ctx, case: Case, label: str, fn, z, ref, roof, cuda: bool) -> Row:
    row = Row(SUITE, case.name, label, case.sizes(), case.dtype, unit="rows/s")
    try:
        if cuda:
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(z)  # the warm-up call: compilation (numba, torch.compile, Triton) lands here
        if cuda:
            torch.cuda.synchronize()
        row.compile_s = time.perf_counter() - t0
        row.quality = _quality(out, ref)
        del out
        timing = time_call(ctx, lambda: fn(z), cuda=cuda, warmup=0)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, never dropped
        row.status = failure(exc)
        return row
    row.seconds, row.median_s, row.repeats = timing.best, timing.median, timing.repeats
    row.throughput = case.rows / timing.best
    gbps = case.pass_bytes / timing.best / 1e9
    row.roofline_pct = 100 * gbps / roof.gbps
    row.quality = {"GB/s": gbps, **row.quality}
    return row


def _ratios(rows: list[Row]) -> None:
    """Speed-up of every row against numpy and torch eager of the same case (same run)."""
    base = {r.implementation: r.seconds for r in rows if r.ok and r.implementation in ("numpy", "torch eager")}
    for r in rows:
        if r.ok and r.seconds:
            r.ratios = {f"vs {name}": seconds / r.seconds for name, seconds in base.items()}


def _plot(ctx) -> None:
    """Predictions/s against batch size per implementation (CPU, M=5, C=10, float32), log-log."""
    points: dict[str, list[tuple[int, float]]] = {}
    for r in ctx.rows:
        if (r.suite == SUITE and r.ok and r.case in ("batch sweep", "headline") and r.dtype == "float32"
                and r.sizes.get("M") == 5 and r.sizes.get("C") == 10 and r.throughput):
            points.setdefault(r.implementation, []).append((r.sizes["B"], r.throughput))
    if not points:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        ctx.note(f"no plot: matplotlib is not installed ({exc})")
        return
    from ..machine import machine_info

    info = machine_info()
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=120)
    markers = "os^vD<>ph*"
    for i, (label, pts) in enumerate(sorted(points.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=label)
    roof = ctx.rooflines.get("cpu")
    if roof is not None:
        # The rate at which the pass could go if it only had to move its bytes at copy speed.
        ceiling = roof.gbps * 1e9 / Case("roof", 1, 5, 10, "float32").pass_bytes
        ax.axhline(ceiling, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"memory roof: {roof.gbps:.1f} GB/s copy / {Case('roof', 1, 5, 10, 'float32').pass_bytes} B a row",
                    (0.01, ceiling), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("predictions / s (best of up to 5 after a warm-up)")
    ax.set_title(
        f"Ensemble-signal pass, M=5, C=10, float32\n{info['cpu']}, {ctx.threads} threads, {ctx.stem}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    path = ctx.out_dir / f"{ctx.stem}-signals.png"
    fig.savefig(path)
    plt.close(fig)
    ctx.artefacts.append(str(path))
