"""numba backend specifics: its float32 exp/log/widening against numpy, block boundaries, both
kernels on every dtype, thread-count and position independence, extreme finite logits.

The common harness (test_signals.py) already runs the dispatched numba backend against the float64
reference on the shared shape sweep; these tests reach what dispatch alone does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from hitl_triage.kernels.signals import numba_cpu, numba_specialise  # noqa: E402
from hitl_triage.kernels.signals.numba_cpu import BLOCK_ROWS, ensemble_signals_numba  # noqa: E402
from hitl_triage.kernels.signals.reference import ensemble_signals_reference  # noqa: E402

from signal_cases import assert_signals_match, make_logits  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FLOAT_FIELDS = ("confidence", "margin", "total_entropy", "expected_entropy", "mutual_info", "vote_agreement")


# --- the float32 building blocks -------------------------------------------------------------

@numba.njit(fastmath=numba_cpu.MATH_FLAGS)
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = numba_cpu.exp32(x[i])


@numba.njit(fastmath=numba_cpu.MATH_FLAGS)
def _exp_softmax_all(x, out):
    for i in range(x.size):
        out[i] = numba_cpu.exp_softmax(x[i])


@numba.njit(fastmath=numba_cpu.MATH_FLAGS)
def _log_all(x, out):
    for i in range(x.size):
        out[i] = numba_cpu.log32(x[i])


@numba.njit(fastmath=numba_cpu.MATH_FLAGS)
def _widen_all(bits, bf16, out):
    for i in range(bits.size):
        h = np.int32(bits[i])
        out[i] = numba_cpu.bf16_to_f32(h) if bf16 else numba_cpu.f16_to_f32(h)


def _ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the correctly rounded result."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def _around(points, count=2000):
    """The float32 neighbours of each point: the range edges where range reduction switches."""
    out = []
    for p in np.asarray(points, np.float32):
        lo = hi = p
        for _ in range(count):
            lo = np.nextafter(lo, np.float32(-np.inf))
            hi = np.nextafter(hi, np.float32(np.inf))
            out += [lo, hi]
        out.append(p)
    return np.array(out, np.float32)


def test_exp32_against_numpy_over_the_whole_range():
    # Dense sweep of the finite-result range, plus the neighbours of its edges, of the denormal
    # boundary (-87.34) and of points where the rounding of x*log2(e) flips.
    x = np.concatenate([
        np.linspace(-105.0, 89.0, 2_000_001, dtype=np.float32),
        _around([numba_cpu.EXP_LO, numba_cpu.EXP_HI, -87.336544, 0.0, 0.34657359, -0.34657359, -70.0]),
    ])
    got = np.empty_like(x)
    _exp_all(x, got)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        exact32 = exact.astype(np.float32)
    normal = np.isfinite(exact32) & (exact >= np.finfo(np.float32).tiny)
    # Cephes' float32 polynomial is good to about 1 ulp; 2 leaves room for FMA contraction
    # differences between machines and still catches a wrong coefficient (~1e3 ulp).
    worst = _ulp_error(got[normal], exact[normal]).max()
    assert worst <= 2.0, f"exp32: {worst:.2f} ulp off numpy on normal results"
    denormal = (exact < np.finfo(np.float32).tiny) & (exact32 > 0)
    assert denormal.sum() > 1000, "the sweep must reach denormal results"
    smallest = np.float64(np.finfo(np.float32).smallest_subnormal)
    worst_den = (np.abs(got[denormal] - exact[denormal]) / smallest).max()
    assert worst_den <= 1.0, f"exp32: denormal results {worst_den:.2f} denormal steps off"
    assert np.all(got[x > numba_cpu.EXP_HI] == np.inf), "exp32 must overflow to +inf"
    assert np.all(got[x < numba_cpu.EXP_LO] == 0.0), "exp32 must underflow to 0"
    assert np.all(got[np.isinf(exact32) & (x <= numba_cpu.EXP_HI)] == np.inf)


def test_exp_softmax_is_exp32_on_its_domain():
    # The kernels' exp skips clamping and the two-step scaling: on [-87, 0] (every value the
    # softmax feeds it, D_FLOOR = -70 included) it must give exp32's bits.
    x = np.concatenate([np.linspace(-87.0, 0.0, 2_000_001, dtype=np.float32),
                        _around([numba_cpu.D_FLOOR, 0.0, -87.0], 1000)])
    x = x[(x >= -87.0) & (x <= 0.0)]
    a = np.empty_like(x)
    b = np.empty_like(x)
    _exp_softmax_all(x, a)
    _exp_all(x, b)
    assert np.array_equal(a.view(np.int32), b.view(np.int32)), f"differs at x={x[a != b][:5]}"


def test_row_wise_helpers_keep_exp_and_log_exact(rng):
    # The math helpers are inlined into their caller and take its fast-math flags; under
    # "reassoc" LLVM folds exp's range reduction. The row-wise kernel's exp and p*log(p) loops
    # must therefore give exp32's and log32's bits.
    z = rng.uniform(-90.0, 5.0, size=100_003).astype(np.float32)
    e = np.empty_like(z)
    d = np.empty_like(z)
    numba_cpu._member_exp(z, np.float32(5.0), np.float32(0.9), e, d)
    want = np.empty_like(z)
    _exp_all(d, want)
    assert np.array_equal(e.view(np.int32), want.view(np.int32))
    p = rng.uniform(1e-30, 1.0, size=100_003).astype(np.float32)
    plogp = np.empty_like(p)
    numba_cpu._p_log_p(p, plogp)
    logs = np.empty_like(p)
    _log_all(p, logs)
    assert np.array_equal(plogp.view(np.int32), (p * logs).view(np.int32))


def test_log32_against_numpy_for_every_exponent_and_denormals(rng):
    # Random mantissas under every float32 exponent (denormals are exponent field 0), plus 1 and
    # its neighbours (cancellation), sqrt(2) (the reduction's switch point) and the extremes.
    bits = (rng.integers(0, 255, size=3_000_000, dtype=np.int64) << 23) | rng.integers(0, 1 << 23, size=3_000_000)
    x = bits.astype(np.int32).view(np.float32)
    x = np.concatenate([
        x[x > 0],
        _around([1.0, 1.41421356, 0.70710678, np.finfo(np.float32).tiny], 5000),
        np.array([np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal], np.float32),
    ])
    got = np.empty_like(x)
    _log_all(x, got)
    exact = np.log(x.astype(np.float64))
    worst = _ulp_error(got, exact).max()
    assert worst <= 2.0, f"log32: {worst:.2f} ulp off numpy (worst at x={x[_ulp_error(got, exact).argmax()]!r})"
    special = np.array([0.0, np.inf], np.float32)
    out = np.empty_like(special)
    _log_all(special, out)
    assert out[0] == -np.inf and out[1] == np.inf


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_16_bit_widening_is_exact_for_every_bit_pattern(fmt):
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    _widen_all(bits, fmt == "bfloat16", got)
    exact = torch.from_numpy(bits.view(np.int16)).view(getattr(torch, fmt)).float().numpy()
    finite = np.isfinite(exact)
    assert np.array_equal(got[finite].view(np.int32), exact[finite].view(np.int32)), (
        f"{fmt}: widening differs at bits {bits[finite][got[finite].view(np.int32) != exact[finite].view(np.int32)][:5]}"
    )


@pytest.mark.parametrize("width, nrows", [(50, 64), (50, 61), (8, 64), (3, 7), (100, 64), (17, 9), (16, 8)])
def test_block_transpose_matches_numpy(width, nrows, rng):
    # 8x8 register tiles plus ragged edges (width or rows not multiples of 8, fewer than 8).
    src = rng.standard_normal(nrows * width).astype(np.float32)
    x = np.full((width, BLOCK_ROWS), np.nan, np.float32)
    numba_cpu._transpose_rows(src, nrows, width, x)
    np.testing.assert_array_equal(x[:, :nrows], src.reshape(nrows, width).T)
    assert np.isnan(x[:, nrows:]).all(), "columns past nrows must be left alone"


# --- the kernels --------------------------------------------------------------------------------

def _run(z, temps=1.3, index=None, **kwargs):
    table = torch.as_tensor(np.atleast_1d(np.asarray(temps, np.float32)))
    idx = None if index is None else torch.as_tensor(index, dtype=torch.int32)
    return ensemble_signals_numba(z.contiguous(), table, idx, **kwargs)


def _assert_identical(a, b, label):
    for name in ("predicted_class", "valid") + FLOAT_FIELDS:
        x, y = getattr(a, name).numpy(), getattr(b, name).numpy()
        # Bit patterns, so NaN == NaN and -0.0 != 0.0.
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (
            f"{label}: {name} differs at rows {np.nonzero(x != y)[0][:10].tolist()}"
        )


@pytest.mark.parametrize("kernel", ["blocked", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_both_kernels_match_reference_on_every_dtype(kernel, dtype, rng):
    # Shapes each kernel would not get by default too: C = 3 row-wise, C = 130 blocked.
    for shape in [(70, 4, 3), (21, 2, 130), (9, 1, 2)]:
        z = make_logits(rng, shape, dtype)
        table = rng.uniform(0.25, 4.0, size=3).astype(np.float32)
        index = rng.integers(0, 3, size=shape[0]).astype(np.int32)
        got = _run(z, table, index, kernel=kernel)
        past_range = kernel == "blocked" and shape[2] > numba_cpu.BLOCKED_MAX_CLASSES
        assert_signals_match(got, z, table, index, f"{kernel} {shape} {dtype}", float32_class_sums=past_range)


@pytest.mark.parametrize("batch", [BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 1, 3 * BLOCK_ROWS + 5])
def test_block_boundaries(batch, rng):
    z = make_logits(rng, (batch, 5, 10), torch.float32)
    got = _run(z, 0.8, kernel="blocked", num_threads=2)
    assert_signals_match(got, z, 0.8, None, f"blocked B={batch}")


@pytest.mark.parametrize("kernel", ["blocked", "rowwise"])
def test_results_do_not_depend_on_threads_or_row_position(kernel, rng):
    # Every block is computed at full width and every row alone, so a row's bits depend neither on
    # its neighbours, nor on where the chunk boundaries fall, nor on the thread count.
    batch = 7 * BLOCK_ROWS + 13
    z = make_logits(rng, (batch, 3, 7), torch.float32)
    table = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    index = rng.integers(0, 4, size=batch).astype(np.int32)
    one = _run(z, table, index, kernel=kernel, num_threads=1)
    for threads in (2, 3):
        _assert_identical(one, _run(z, table, index, kernel=kernel, num_threads=threads), f"{kernel} threads={threads}")
    order = rng.permutation(batch)
    shuffled = _run(z[order], table, index[order], kernel=kernel, num_threads=2)
    _assert_identical(one.map(lambda t: t[order]), shuffled, f"{kernel} shuffled rows")


def test_kernels_agree_with_each_other(rng):
    # Same formulas, different summation order and layout: within float32 rounding of the sums.
    z = make_logits(rng, (300, 6, 20), torch.float32, degenerate=False)
    a = _run(z, 1.1, kernel="blocked")
    b = _run(z, 1.1, kernel="rowwise")
    assert torch.equal(a.valid, b.valid)
    ref = ensemble_signals_reference(z, torch.tensor([1.1]), None)
    decided = ref.margin > 1e-5
    assert torch.equal(a.predicted_class[decided], b.predicted_class[decided])
    for name in FLOAT_FIELDS:
        # 1e-5: a few float32 ulp of values of order 1 (entropies up to log 20 = 3).
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kernel", ["blocked", "rowwise"])
def test_extreme_finite_logits_stay_valid_and_exact(kernel):
    # Any finite logits are valid and give finite, exact signals: float64 beyond the float32 range
    # (shifted in float64 before narrowing), float32 near its max (differences overflow to -inf
    # and are clamped), and +-1e4 where only the max subtraction keeps the softmax exact.
    f32max = float(np.finfo(np.float32).max)
    rows64 = torch.tensor([
        [[1e300, 1e299, -1e300], [0.0, 1.0, 2.0]],
        [[-1e307, 1e307, 5.0], [1e307, 1e307, -1e307]],
        [[1e4, -1e4, 1e4], [-1e4, 1e4, 1e4 - 1]],
    ], dtype=torch.float64)
    rows32 = torch.tensor([
        [[f32max, -f32max, 0.0], [f32max, f32max, -f32max]],
        [[1e4, 1e4 - 1, -1e4], [-3e38, 3e38, 3e38]],
    ], dtype=torch.float32)
    for z in (rows64, rows32):
        got = _run(z, 2.0, kernel=kernel)
        ref = ensemble_signals_reference(z, torch.tensor([2.0]), None)
        assert bool(got.valid.all()), f"{kernel} {z.dtype}: finite rows must be valid"
        assert torch.equal(got.predicted_class.long(), ref.predicted_class)
        for name in FLOAT_FIELDS:
            # The torch float32 yardstick of the common harness overflows on these rows, so the
            # bound is direct: 2e-6 is ~16 float32 ulp of values below log(3).
            torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name), atol=2e-6, rtol=0,
                                       msg=lambda m, name=name: f"{kernel} {z.dtype} {name}: {m}")


@pytest.mark.parametrize("kernel", ["blocked", "rowwise", "specialised"])
def test_one_member_has_no_disagreement_exactly(kernel, rng):
    z = make_logits(rng, (BLOCK_ROWS + 3, 1, 3), torch.float32, degenerate=False)
    got = _run(z, 0.7, kernel=kernel)
    assert torch.equal(got.mutual_info, torch.zeros_like(got.mutual_info))
    assert torch.equal(got.expected_entropy, got.total_entropy)
    assert torch.equal(got.vote_agreement, torch.ones_like(got.vote_agreement))


@pytest.mark.parametrize("kernel", ["blocked", "rowwise", "specialised"])
def test_extreme_temperatures(kernel, rng):
    # 1e-40 is a positive finite float32 whose reciprocal overflows: the softmax is one-hot at the
    # first maximum; 1e30 makes it uniform. Both must match the float64 reference.
    z = make_logits(rng, (20, 3, 4), torch.float32, degenerate=False)
    for t in (1e-40, 1e30):
        got = _run(z, t, kernel=kernel)
        ref = ensemble_signals_reference(z, torch.tensor([t], dtype=torch.float32), None)
        for name in FLOAT_FIELDS:
            # 2e-6: float32 rounding of values below log(4), a few ulp.
            torch.testing.assert_close(getattr(got, name).double(), getattr(ref, name), atol=2e-6, rtol=0,
                                       msg=lambda m, name=name: f"{kernel} T={t} {name}: {m}")


def test_ties_use_the_lowest_index_on_raw_logits():
    # Member argmax is taken on z, not z/T; ties go to the lowest index, for members and the mean.
    z = torch.tensor([[[2.0, 5.0, 5.0, 1.0], [5.0, 2.0, 5.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    got = _run(z, 1.0, kernel="blocked")
    ref = ensemble_signals_reference(z, torch.tensor([1.0]), None)
    assert int(got.predicted_class[0]) == int(ref.predicted_class[0])
    assert float(got.vote_agreement[0]) == pytest.approx(float(ref.vote_agreement[0]), abs=0)
    assert _run(z, 1.0, kernel="rowwise").vote_agreement[0] == got.vote_agreement[0]


def test_one_compiled_version_per_kernel_whatever_the_dtype_or_flags(rng):
    # The logits travel as read-only raw bytes with a dtype code: one machine-code version per
    # kernel (compile time counts in CI), whatever the dtype or the caller's array flags.
    for dtype in DTYPES:
        z = make_logits(rng, (5, 2, 3), dtype, degenerate=False)
        for kernel in ("blocked", "rowwise"):
            _run(z, 1.0, kernel=kernel)
            _run(z, [1.0, 2.0], np.array([0, 1, 0, 1, 1], np.int32), kernel=kernel)
    assert len(numba_cpu._blocked_kernel.signatures) == 1
    assert len(numba_cpu._rowwise_kernel.signatures) == 1
    special = numba_specialise.specialised_kernel(3)
    _run(make_logits(rng, (5, 2, 3), torch.bfloat16), 1.0, kernel="specialised")
    assert len(special.signatures) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_specialised_kernel_gives_the_generic_bits(dtype, rng):
    # The unrolled kernel keeps the generic kernel's operations and their order in every row, so
    # the bits match (float64 goes through the pre-shifted path, float16 through widening). C = 3
    # keeps its compilation short.
    batch = 2 * BLOCK_ROWS + 9
    z = make_logits(rng, (batch, 4, 3), dtype)
    table = rng.uniform(0.25, 4.0, size=4).astype(np.float32)
    index = rng.integers(0, 4, size=batch).astype(np.int32)
    generic = _run(z, table, index, kernel="blocked")
    special = _run(z, table, index, kernel="specialised", num_threads=2)
    _assert_identical(generic, special, f"specialised C=3 {dtype}")
    assert_signals_match(special, z, table, index, f"specialised C=3 {dtype}")


def test_kernel_choice_by_shape_and_batch(monkeypatch):
    pick = numba_cpu._pick_kernel
    monkeypatch.setattr(numba_specialise, "_kernels", {})  # as in a fresh process
    assert pick(None, 10, 5, 3)[0] == "blocked", "small batches never wait for a compilation"
    assert pick(None, numba_cpu.SPECIALISE_MIN_ROWS, 5, 3)[0] == "specialised"
    assert pick(None, 10, 5, 3)[0] == "specialised", "once made, it serves every batch"
    assert pick(None, numba_cpu.SPECIALISE_MIN_ROWS, 5, 40)[0] == "blocked", "C beyond the unrolled range"
    assert pick(None, 10, 5, 1000)[0] == "rowwise"
    assert pick(None, 10, 64, 32)[0] == "rowwise", "blocked scratch would leave L2"
    monkeypatch.setenv(numba_cpu.SPECIALISE_ENV, "0")
    assert pick(None, numba_cpu.SPECIALISE_MIN_ROWS, 5, 3)[0] == "blocked"
    with pytest.raises(ValueError, match="kernel: 'specialised' needs 2 <= C <= 32"):
        pick("specialised", 10, 5, 100)


@pytest.mark.parametrize("failure", ["unwritable cache", "broken module"])
def test_a_specialisation_that_fails_falls_back_to_the_generic_kernel(failure, tmp_path, monkeypatch, caplog):
    if failure == "unwritable cache":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        monkeypatch.setenv("HITL_TRIAGE_NUMBA_CACHE", str(blocker / "cache"))
    else:
        monkeypatch.setenv("HITL_TRIAGE_NUMBA_CACHE", str(tmp_path))
        monkeypatch.setattr(numba_specialise, "generate_source", lambda classes: "kernel = None\n")
    monkeypatch.setattr(numba_specialise, "_kernels", {})
    monkeypatch.setattr(numba_specialise, "_failed", set())
    with caplog.at_level("WARNING", logger=numba_specialise.__name__):
        assert numba_specialise.specialised_kernel(7) is None
    assert caplog.text.count("no kernel specialised for C=7") == 1
    assert numba_cpu._pick_kernel(None, numba_cpu.SPECIALISE_MIN_ROWS, 2, 7)[0] == "blocked"
    assert caplog.text.count("no kernel specialised for C=7") == 1, "logged once, not per call"


def test_precompile_readies_the_kernels_of_a_shape(monkeypatch):
    monkeypatch.setattr(numba_specialise, "_kernels", {})  # as in a fresh process
    assert numba_cpu.precompile(4, 3) == ["blocked", "specialised"]
    assert numba_specialise.loaded_kernel(3) is not None, "later small batches use it too"
    assert numba_cpu.precompile(2, 500) == ["rowwise"]


def test_generated_source_names_its_class_count():
    src = numba_specialise.generate_source(5)
    compile(src, "<generated>", "exec")  # valid Python
    assert "CLASSES = 5" in src and "e4 = exp_softmax(d4)" in src and "e5" not in src
    with pytest.raises(ValueError, match="classes: expected 2..32, found 33"):
        numba_specialise.generate_source(33)


def test_concurrent_callers_get_their_own_results(rng):
    # The kernels release the GIL and the thread settings are per calling thread: a server may call
    # from several threads at once (batches large enough to run on several threads each).
    import threading

    zs = [make_logits(rng, (30_000 + 997 * i, 5, 10), torch.float32) for i in range(3)]
    alone = [_run(z, 1.3) for z in zs]
    failures = []

    def work(i):
        for _ in range(3):
            got = _run(zs[i], 1.3)
            if not (torch.equal(got.predicted_class, alone[i].predicted_class)
                    and torch.equal(got.confidence.nan_to_num(-1), alone[i].confidence.nan_to_num(-1))):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"callers {sorted(set(failures))} got results that differ from a lone call"


def test_thread_count_rules():
    assert numba_cpu.thread_count(1, 5, 10, None) == 1, "a tiny batch must not wake other threads"
    big = numba_cpu.thread_count(10_000_000, 5, 10, None)
    assert big == numba.get_num_threads()
    assert numba_cpu.thread_count(10, 5, 10, 3) == 3, "an explicit count is honoured"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads: expected a positive integer"):
            numba_cpu.thread_count(10, 5, 10, bad)
    # Pieces: the whole range on one thread; else about 8 per thread, none below 16k logits.
    assert numba_cpu.piece_size(1000, 50 * 64, 1) == 1000
    assert numba_cpu.piece_size(1000, 50 * 64, 2) == 63
    assert numba_cpu.piece_size(10, 50 * 64, 2) == 6, "pieces of at least MIN_LOGITS_PER_PIECE"
    assert numba_cpu.piece_size(3, 10 ** 6, 2) == 1
    before = numba.get_num_threads()
    _run(torch.zeros(3, 2, 4), 1.0, num_threads=1)
    assert numba.get_num_threads() == before, "the caller's numba thread count must be restored"
    assert numba.get_parallel_chunksize() == 0, "and its chunk size"


def test_bad_arguments_name_the_field():
    z = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match=r"temperature_index: expected values in \[0, 2\), found range \[0, 5\]"):
        ensemble_signals_numba(z, torch.tensor([1.0, 2.0]), torch.tensor([0, 1, 5, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="temperature_index: required"):
        ensemble_signals_numba(z, torch.tensor([1.0, 2.0]), None)
    with pytest.raises(ValueError, match="logits: expected a C-contiguous"):
        ensemble_signals_numba(z.transpose(1, 2), torch.tensor([1.0]), None)
    with pytest.raises(TypeError, match="logits: expected float16, bfloat16, float32 or float64, found torch.int32"):
        ensemble_signals_numba(z.int(), torch.tensor([1.0]), None)
    with pytest.raises(ValueError, match="kernel: expected 'blocked', 'rowwise' or 'specialised'"):
        ensemble_signals_numba(z, torch.tensor([1.0]), None, kernel="simd")


def test_logits_are_read_in_place_not_copied(rng, monkeypatch):
    # The kernels get a view of the caller's buffer (zero-copy), for every dtype.
    seen = []
    real = numba_cpu._raw_bytes

    def spy(t):
        raw = real(t)
        seen.append(raw.__array_interface__["data"][0])
        return raw

    monkeypatch.setattr(numba_cpu, "_raw_bytes", spy)
    pointers = []
    for dtype in DTYPES:
        z = make_logits(rng, (3, 2, 5), dtype, degenerate=False)
        pointers.append(z.data_ptr())
        _run(z, 1.0)
    assert seen == pointers
