"""Clocks for the benchmarks: best-of-N after a warm-up, device-synchronised on CUDA, and the
memory roofline (a large copy) that the signal pass is compared with.

Why best-of-N and not the mean: the machine is shared and noisy; interference only ever adds
time, so the fastest of several runs is the closest to what the code itself costs. The median
is kept beside it so a reader can see how noisy the run was.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Timing:
    """Seconds per call. ``first`` is the warm-up call (compilation, caches, allocation)."""

    best: float
    median: float
    times: list[float]
    first: float

    @property
    def repeats(self) -> int:
        return len(self.times)


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_s: float | None = None,
    warmup: int = 1,
    cuda: bool = False,
    min_sample_s: float = 0.0,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls (the first one's time is kept as ``first``), then up
    to ``repeats`` timed calls, stopping after ``min_repeats`` once ``budget_s`` seconds of timed
    calls have passed (so a slow peer cannot eat the whole quick run).

    With ``cuda`` the device is synchronised before the clock is started and before it is read
    (device work is asynchronous; an unsynchronised clock measures the launch only).

    ``min_sample_s``: calls faster than this are repeated inside one timed sample (the count set
    from the warm-up call) and the sample divided by the count, so microsecond calls are not
    swamped by the clock's own resolution and jitter.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, found {repeats}")
    sync = _cuda_sync if cuda else (lambda: None)
    first = 0.0
    for i in range(max(warmup, 0)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    number = 1
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats:
        sync()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if number == 1 and not times and dt < min_sample_s:
            # Too fast to time one call at a time: this sample only sets how many calls a sample
            # holds (it is dropped, so slow calls pay nothing for the calibration).
            number = max(2, min(100_000, int(min_sample_s / max(dt, 1e-7)) + 1))
            continue
        times.append(dt / number)
        spent += dt
        if budget_s is not None and spent > budget_s and len(times) >= min_repeats:
            break
    return Timing(best=min(times), median=statistics.median(times), times=times, first=first if warmup else times[0])


def measure_cuda_events(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Like :func:`measure` on CUDA, timed with CUDA events (device time, no host jitter)."""
    import torch

    first = 0.0
    for i in range(max(warmup, 0)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
    return Timing(best=min(times), median=statistics.median(times), times=times, first=first)


@dataclasses.dataclass
class Roofline:
    """A measured copy rate: ``gbps`` is (bytes read + bytes written) / seconds / 1e9."""

    name: str
    gbps: float
    nbytes: int
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def host_copy_roofline(nbytes: int = 512 * 2**20, repeats: int = 5) -> Roofline:
    """The CPU memory roof: a large ``np.copyto`` (one thread, as numpy copies), random data.

    The buffers are far larger than the last-level cache, so the copy runs at memory speed; the
    destination is written once before timing so page faults stay out of the numbers.
    """
    n = nbytes // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    t = measure(lambda: np.copyto(dst, src), repeats=repeats, min_repeats=repeats)
    return Roofline("numpy copyto", 2 * src.nbytes / t.best / 1e9, 2 * src.nbytes, t.best)


def torch_host_copy_roofline(nbytes: int = 512 * 2**20, repeats: int = 5) -> Roofline:
    """The same copy through torch (which may use several threads): reported for reference."""
    import torch

    n = nbytes // 4
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), repeats=repeats, min_repeats=repeats)
    return Roofline("torch copy_ (cpu)", 2 * n * 4 / t.best / 1e9, 2 * n * 4, t.best)


def device_copy_roofline(nbytes: int = 2 * 2**30, repeats: int = 10) -> Roofline:
    """The GPU memory roof: a device-to-device copy of a large buffer, timed with CUDA events."""
    import torch

    n = nbytes // 4
    src = torch.rand(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = measure_cuda_events(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    return Roofline("cuda device-to-device copy", 2 * n * 4 / t.best / 1e9, 2 * n * 4, t.best)
