"""Triton-specific tests of the signal pass: what the common sweep (test_signals.py) cannot reach.

Tile and row-block boundaries (with block sizes forced small through the launcher), M=64 in the
tiled kernel, per-row temperature tables, exact ties across class tiles, float64 logits beyond the
float32 range, the block-size helper's errors, and an offline compile of the kernels for sm_90
(the H100 / H200), which catches what the interpreter tolerates and the GPU compiler rejects.

Every numeric comparison goes through ``signal_cases.assert_signals_match`` (float64 reference;
tolerance twice the error of the same formulas in torch float32, plus a small atol, see there).
Each case runs on CPU tensors under TRITON_INTERPRET=1, and on CUDA where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hitl_triage.kernels._dispatch import triton_interpreting
from hitl_triage.kernels.signals import triton_gpu
from hitl_triage.kernels.signals.reference import ensemble_signals_reference

from signal_cases import assert_signals_match, make_logits

# NaN and ±inf rows make numpy, inside Triton's interpreter, warn about invalid values; those
# rows are thrown away by design (and checked to come back NaN / -1).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _dtype_id(d):
    return str(d).removeprefix("torch.")


def _run(z, temps, index, device, **overrides):
    """Launch on ``device`` with forced block sizes; results come back on the CPU."""
    temps_t = torch.as_tensor(np.asarray(temps, dtype=np.float32)).reshape(-1).to(device)
    index_t = None if index is None else torch.as_tensor(index, dtype=torch.int32).to(device)
    out = triton_gpu._launch(z.to(device).contiguous(), temps_t, index_t, **overrides)
    assert out.confidence.device.type == device, "results must stay on the input's device"
    return out.map(lambda t: t.cpu())


def _shuffled_logits(rng, shape, dtype):
    """make_logits' degenerate rows (NaN, ±inf, ±1e4, ties) moved to random rows, so that they
    fall on row-block edges as well as inside blocks."""
    z = make_logits(rng, shape, dtype)
    return z[torch.from_numpy(rng.permutation(shape[0]))].contiguous()


def _table(rng, batch, size=5):
    """A per-row temperature table with extremes, and every row's index into it."""
    table = np.concatenate([[0.05, 20.0], rng.uniform(0.3, 3.0, size=size - 2)]).astype(np.float32)
    return table, rng.integers(0, size, size=batch).astype(np.int32)


# (C, BLOCK_C) for the tiled kernel: C one below, at and above a tile, and several tiles.
TILED_CLASSES = [(7, 8), (8, 8), (9, 8), (17, 8), (33, 16), (2, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("classes, block_c", TILED_CLASSES, ids=lambda v: str(v))
def test_tiled_kernel_at_tile_boundaries(classes, block_c, dtype, device, rng):
    shape = (11, 3, classes)  # 11 rows in blocks of 4: the last block is partly masked
    z = _shuffled_logits(rng, shape, dtype)
    table, index = _table(rng, shape[0])
    for temps, idx in [(1.3, None), (table, index)]:
        got = _run(z, temps, idx, device, tiled=True, block_c=block_c, block_r=4)
        assert_signals_match(got, z, temps, idx, f"tiled {shape} BLOCK_C={block_c} {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("batch", [3, 4, 5, 13])
@pytest.mark.parametrize("classes", [15, 16, 17])
def test_fused_kernel_at_row_block_and_class_edges(batch, classes, dtype, device, rng):
    shape = (batch, 2, classes)
    z = _shuffled_logits(rng, shape, dtype)
    table, index = _table(rng, batch)
    got = _run(z, table, index, device, block_r=4)
    assert_signals_match(got, z, table, index, f"fused {shape} BLOCK_R=4 {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiled", [False, True], ids=["fused", "tiled"])
def test_sixty_four_members(tiled, device, rng):
    shape = (9, 64, 12)
    z = _shuffled_logits(rng, shape, torch.float32)
    table, index = _table(rng, shape[0])
    overrides = dict(tiled=True, block_c=8, block_r=8) if tiled else dict(block_r=8)
    got = _run(z, table, index, device, **overrides)
    assert_signals_match(got, z, table, index, f"M=64 {'tiled' if tiled else 'fused'} {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_large_class_count_default_plan(device, rng):
    """C = 32768 through the automatic plan (tiled, 1024-class tiles): kept to 2 rows here
    because the common sweep skips it under the interpreter."""
    shape = (2, 2, 32768)
    z = make_logits(rng, shape, torch.float32, degenerate=False)
    plan = triton_gpu._plan(*shape)
    assert plan.tiled and plan.block_c == triton_gpu.TILED_BLOCK_C
    got = _run(z, 0.7, None, device)
    assert_signals_match(got, z, 0.7, None, f"{shape} default plan {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiled", [False, True], ids=["fused", "tiled"])
def test_exact_ties_take_the_lowest_index_across_tiles(tiled, device):
    """Equal maxima in different class tiles: the member argmax, the predicted class (lowest
    index) and a zero margin are exact, not a matter of tolerance."""
    classes, block_c = 20, 8
    low, high = 3, 13  # in tiles 0 and 1 of the tiled kernel
    z = torch.full((4, 3, classes), -2.0)
    z[:, :, low] = z[:, :, high] = 5.0  # all members tie at the same pair
    z[1, 0, 17] = 9.0  # row 1: member 0 prefers 17, the mean still ties low / high
    z[2, :, high] = 5.5  # row 2: everyone prefers the later tile
    z[3, 1, :] = 0.0  # row 3: member 1 all equal, its argmax is class 0
    overrides = dict(tiled=True, block_c=block_c, block_r=2) if tiled else {}
    got = _run(z, 1.0, None, device, **overrides)
    ref = ensemble_signals_reference(z, torch.tensor([1.0]), None)
    assert got.predicted_class.tolist() == ref.predicted_class.tolist() == [low, low, high, low]
    # 2/3 rounds once in float32; the GPU's division may be off by an ulp.
    torch.testing.assert_close(got.vote_agreement.double(), ref.vote_agreement, atol=1e-6, rtol=0)
    assert got.margin[0].item() == 0.0 and got.margin[3].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiled", [False, True], ids=["fused", "tiled"])
def test_float64_beyond_float32_range_is_valid(tiled, device):
    """1e300 is a finite float64 logit: valid, and decided (one-hot), not mistaken for inf."""
    z = torch.zeros((3, 2, 10), dtype=torch.float64)
    z[0, :, 4] = 1e300
    z[1, 0, 2], z[1, 1, 7] = 1e300, -1e300
    z[2, :, :] = -1e300
    z[2, :, 9] = np.inf  # still invalid
    overrides = dict(tiled=True, block_c=4) if tiled else {}
    got = _run(z, 2.0, None, device, **overrides)
    ref = ensemble_signals_reference(z, torch.tensor([2.0]), None)
    assert got.valid.tolist() == ref.valid.tolist() == [True, True, False]
    assert got.predicted_class.tolist() == ref.predicted_class.tolist()
    for name in ("confidence", "margin", "total_entropy", "expected_entropy", "mutual_info", "vote_agreement"):
        g, r = getattr(got, name)[:2].double(), getattr(ref, name)[:2]
        # Row 0 is one-hot; row 1 mixes a one-hot member with a uniform one over 9 classes: a
        # dozen float32 terms of size <= ln 9, each rounded to within 2.4e-7.
        torch.testing.assert_close(g, r, atol=2e-6, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("tiled", [False, True], ids=["fused", "tiled"])
def test_wholly_non_finite_rows_and_members(tiled, dtype, device, rng):
    """Rows whose members are entirely NaN or ±inf (not just one entry) next to valid rows: the
    invalid ones come back -1 / NaN and their neighbours in the same row block are untouched."""
    z = make_logits(rng, (8, 3, 12), dtype, degenerate=False)
    z[1] = float("nan")
    z[2, 1] = float("nan")
    z[4, 0] = float("inf")
    z[5, 2] = -float("inf")
    z[6, :, :6] = float("inf")
    z[6, :, 6:] = -float("inf")
    overrides = dict(tiled=True, block_c=4, block_r=4) if tiled else dict(block_r=4)
    got = _run(z, 0.9, None, device, **overrides)
    assert got.valid.tolist() == [True, False, False, True, False, False, False, True]
    assert_signals_match(got, z, 0.9, None, f"non-finite rows {'tiled' if tiled else 'fused'} {dtype} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiled", [False, True], ids=["fused", "tiled"])
def test_one_member_has_exactly_zero_mutual_information(tiled, device, rng):
    z = make_logits(rng, (13, 1, 9), torch.float32, degenerate=False)
    overrides = dict(tiled=True, block_c=4, block_r=4) if tiled else dict(block_r=4)
    got = _run(z, 1.1, None, device, **overrides)
    assert torch.all(got.mutual_info == 0.0), got.mutual_info
    assert torch.all(got.vote_agreement == 1.0), got.vote_agreement
    assert_signals_match(got, z, 1.1, None, f"M=1 {'tiled' if tiled else 'fused'} {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_temperatures(device, rng):
    """A tiny T sends every member to one-hot (the per-row scale is clamped, not inf), a huge T
    to uniform; mixed in one table."""
    shape = (16, 3, 6)
    z = make_logits(rng, shape, torch.float32, degenerate=False)
    table = np.array([1e-30, 1e30, 1.0], dtype=np.float32)
    index = rng.integers(0, 3, size=shape[0]).astype(np.int32)
    got = _run(z, table, index, device, block_r=4)
    assert_signals_match(got, z, table, index, f"extreme T {device}")
    assert got.valid.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=4, members=2, classes=10, block_c=12), r"block_c: expected a power of two <= \d+, found 12"),
        (dict(batch=4, members=2, classes=10, block_c=8), r"block_c: the fused kernel holds a whole member row, expected >= C=10, found 8"),
        (dict(batch=4, members=2, classes=10, block_c=8, block_r=3, tiled=True), r"block_r: expected a power of two .* found block_r=3"),
        (dict(batch=4, members=2, classes=10, block_c=1024, block_r=64, tiled=True), r"block_r=64, block_c=1024"),
        (dict(batch=4, members=2000, classes=5000), r"at most 1024 members, found M=2000"),
        (dict(batch=4, members=2**16, classes=2**16), r"M \* C = 65536 \* 65536 = 4294967296"),
        (dict(batch=0, members=2, classes=10), r"found B=0"),
        (dict(batch=4, members=2, classes=1), r"at least 2 classes, found C=1"),
    ],
)
def test_plan_rejects_out_of_range_sizes(kwargs, match):
    kwargs = dict(kwargs)
    shape = kwargs.pop("batch"), kwargs.pop("members"), kwargs.pop("classes")
    with pytest.raises(ValueError, match=match):
        triton_gpu._plan(*shape, **kwargs)


def test_plan_defaults():
    """The automatic plan: fused up to FUSED_MAX_CLASSES, power-of-two blocks within the tile."""
    for shape in [(1, 1, 2), (1_000_000, 5, 10), (300, 7, 781), (9, 2, 2048), (9, 2, 2049), (9, 64, 32768)]:
        plan = triton_gpu._plan(*shape)
        assert plan.tiled == (shape[2] > triton_gpu.FUSED_MAX_CLASSES), (shape, plan)
        assert plan.block_c >= shape[2] or plan.tiled, (shape, plan)
        for size in (plan.block_r, plan.block_c, plan.block_m, plan.num_warps):
            assert size & (size - 1) == 0, (shape, plan)
        assert plan.block_r <= max(1, triton_gpu.TILE_ELEMENTS // plan.block_c), (shape, plan)


def test_launcher_checks_its_inputs(monkeypatch):
    z = torch.zeros((4, 2, 3))
    t = torch.ones(1)
    with pytest.raises(ValueError, match="logits: expected a contiguous tensor"):
        triton_gpu._launch(z.transpose(0, 2), t, None)
    with pytest.raises(ValueError, match=r"temperatures: expected a float32 table \[K >= 1\], found torch.float64"):
        triton_gpu._launch(z, t.double(), None)
    with pytest.raises(ValueError, match="temperature_index: required with a table of 2"):
        triton_gpu._launch(z, torch.ones(2), None)
    with pytest.raises(ValueError, match=r"temperature_index: expected int32 \(4,\), found torch.int64"):
        triton_gpu._launch(z, torch.ones(2), torch.zeros(4, dtype=torch.int64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor .* found device cpu"):
        triton_gpu._launch(z, t, None)


def test_kernels_compile_for_hopper():
    """Compile for sm_90 with Triton's bundled ptxas (no GPU needed) the plans of the benchmark
    shape (fp16 and fp32: must not spill), of per-row tables in bf16, of one member and two
    classes (M=1 becomes a compile-time constant) and of the tiled float64 kernel with 64
    members."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = ["1000000x5x10:float16", "1000000x5x10:float32", "300x7x781:bfloat16:index",
             "4096x1x2:float32:index", "9x64x4097:float64:index"]
    result = subprocess.run(
        [sys.executable, "-m", "hitl_triage.kernels.signals.triton_offline", *cases],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, f"offline compile failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == len(cases), result.stdout
    for line in lines[:2]:
        assert "stack=0" in line, f"the benchmark shape's kernel spills registers: {line}"


@pytest.mark.gpu
def test_row_offsets_beyond_int32():
    """B * M * C > 2**31 elements: the last rows (whose offsets overflow int32) match the
    reference computed on them alone."""
    members, classes = 5, 10
    batch = 2**31 // (members * classes) + 1000
    z = torch.empty((batch, members, classes), dtype=torch.float16, device="cuda")
    z.normal_(0.0, 3.0)
    out = triton_gpu._launch(z, torch.ones(1, device="cuda"), None)
    tail = z[-2000:].cpu()
    got = out.map(lambda t: t[-2000:].cpu())
    assert_signals_match(got, tail, 1.0, None, "rows past 2**31 elements")
