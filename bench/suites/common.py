"""Helpers every suite uses: timing settings per mode, failure text, the shared rooflines."""

from __future__ import annotations

from ..timing import Timing, device_copy_roofline, host_copy_roofline, measure, measure_cuda_events, torch_host_copy_roofline


def failure(exc: BaseException, prefix: str = "failed") -> str:
    """'failed: TypeName: first line of the message' (tables stay one line a row)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{prefix}: {type(exc).__name__}" + (f": {text}" if text else "")


def not_yet(exc: BaseException) -> str:
    """The status of one of our implementations that has not landed yet."""
    return failure(exc, "not available yet")


def time_call(ctx, fn, *, cuda: bool = False, budget_s: float | None = None, warmup: int = 1,
              quick_min_repeats: int = 3, full_budget_s: float | None = None) -> Timing:
    """Best of 5 after ``warmup`` untimed calls (0 when the caller already made the first call).
    Quick mode stops after ``quick_min_repeats`` timed calls once ``budget_s`` (default 2.5 s) is
    spent, so one slow peer cannot take the whole run; full mode does 5, or, with
    ``full_budget_s``, stops after 2 once that much time is spent (for calls of tens of seconds)."""
    if cuda:
        return measure_cuda_events(fn, repeats=10 if not ctx.quick else 5, warmup=max(warmup, 1))
    if ctx.quick:
        return measure(fn, repeats=5, min_repeats=quick_min_repeats,
                       budget_s=budget_s if budget_s is not None else 2.5, min_sample_s=0.02, warmup=warmup)
    if full_budget_s is not None:
        return measure(fn, repeats=5, min_repeats=2, budget_s=full_budget_s, min_sample_s=0.05, warmup=warmup)
    return measure(fn, repeats=5, min_repeats=5, min_sample_s=0.05, warmup=warmup)


def host_roofline(ctx):
    """The CPU memory roof of this run (a large numpy copy), measured once and shared."""
    if "cpu" not in ctx.rooflines:
        ctx.rooflines["cpu"] = host_copy_roofline()
        ctx.rooflines["cpu_torch"] = torch_host_copy_roofline()
        r, t = ctx.rooflines["cpu"], ctx.rooflines["cpu_torch"]
        ctx.console.print(f"  memory roof: numpy copy {r.gbps:.1f} GB/s (torch copy_ {t.gbps:.1f} GB/s, for reference)")
    return ctx.rooflines["cpu"]


def device_roofline(ctx):
    """The GPU memory roof of this run (a device-to-device copy timed with events)."""
    if "cuda" not in ctx.rooflines:
        ctx.rooflines["cuda"] = device_copy_roofline()
        ctx.console.print(f"  device memory roof: copy {ctx.rooflines['cuda'].gbps:.0f} GB/s")
    return ctx.rooflines["cuda"]


def banks_from_env(variable: str, sizes: list, bank_of) -> list:
    """``sizes`` (a suite's cases), only those whose bank ``bank_of(case)`` is named in the
    environment ``variable`` (comma-separated bank sizes) when it is set."""
    import os

    wanted = os.environ.get(variable, "").strip()
    if not wanted:
        return sizes
    try:
        banks = {int(b.replace("_", "")) for b in wanted.split(",") if b.strip()}
    except ValueError:
        raise ValueError(f"{variable}: expected comma-separated bank sizes, found {wanted!r}") from None
    kept = [s for s in sizes if bank_of(s) in banks]
    if not kept:
        raise ValueError(f"{variable}: expected bank sizes among {[bank_of(s) for s in sizes]} in this mode, "
                         f"found {wanted!r}")
    return kept
