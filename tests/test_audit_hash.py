"""The audit draw against an independent XXH64 (the ``xxhash`` package), on every backend.

Every comparison is exact: the draw is a 53-bit integer times 2**-53, so any difference at all is a
bug (a wrong byte, a lost carry, a signed shift), never rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch
import xxhash
from scipy import stats

from hitl_triage.kernels import BackendUnavailable
from hitl_triage.kernels._dispatch import triton_interpreting
from hitl_triage.kernels.audit import REGISTRY, audit_uniform

CPU_BACKENDS = REGISTRY.available("cpu")
SEEDS = [0, 1, 2**64 - 1]
HAS_CUDA = torch.cuda.is_available()

# Rows per case: the reference is pure Python and Triton's interpreter runs each program in numpy,
# so both get small inputs; numba gets enough rows to spread over threads.
ROWS = {"reference": 300, "triton": 160, "numba": 4000}

# Code points for random ids: ASCII, Latin-1, Greek/Cyrillic, CJK and emoji, so that ids hold
# 1-, 2-, 3- and 4-byte UTF-8 characters.
CODE_POINT_RANGES = [(0x20, 0x7F), (0xA0, 0x100), (0x370, 0x500), (0x4E00, 0xA000), (0x1F300, 0x1F650)]


def expected_uniform(keys: list[bytes], seed: int) -> np.ndarray:
    """The draws as an outside auditor computes them, with the ``xxhash`` package."""
    return np.array([(xxhash.xxh64_intdigest(k, seed) >> 11) * 2.0**-53 for k in keys], dtype=np.float64)


def int_keys(values) -> list[bytes]:
    """The bytes hashed for int64 ids: 8 bytes, little-endian, two's complement."""
    raw = np.asarray(values, dtype=np.int64).astype("<i8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def random_ints(rng, n: int) -> np.ndarray:
    special = np.array([0, 1, -1, 2**63 - 1, -(2**63), 2**32, -(2**32), 255], dtype=np.int64)
    body = rng.integers(-(2**63), 2**63 - 1, size=max(n - special.size, 0), dtype=np.int64, endpoint=True)
    return np.concatenate([special, body])[:n]


def random_strings(rng, n: int) -> list[str]:
    """n random strings: first ASCII ones of every byte length 0..100 (every path of XXH64:
    each tail after 0..3 stripes), then unicode ones of 0..100 characters of 1 to 4 UTF-8 bytes."""
    out = ["".join(map(chr, rng.integers(0x20, 0x7F, size=length))) for length in range(min(n, 101))]
    for length in rng.integers(0, 101, size=max(n - 101, 0)):
        which = rng.integers(0, len(CODE_POINT_RANGES), size=length)
        lo = np.array([CODE_POINT_RANGES[w][0] for w in which], dtype=np.int64)
        hi = np.array([CODE_POINT_RANGES[w][1] for w in which], dtype=np.int64)
        out.append("".join(map(chr, rng.integers(lo, hi))))
    return out


def assert_same(got, want, label: str) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float64, f"{label}: expected float64 draws, found {got.dtype}"
    assert got.shape == want.shape, f"{label}: expected shape {want.shape}, found {got.shape}"
    diff = np.flatnonzero(got.view(np.uint64) != want.view(np.uint64))
    assert diff.size == 0, (
        f"{label}: {diff.size} of {want.size} draws differ; first rows {diff[:5].tolist()}: "
        f"got {got[diff[:5]].tolist()}, want {want[diff[:5]].tolist()}"
    )


# ---------------------------------------------------------------------------------------------
# Against xxhash


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int64_ids_match_xxhash(backend, seed, rng):
    ids = random_ints(rng, ROWS[backend])
    want = expected_uniform(int_keys(ids), seed)
    for label, given in [("arrow", pa.array(ids)), ("numpy", ids), ("torch", torch.from_numpy(ids))]:
        got = audit_uniform(given, seed, backend=backend)
        assert_same(got, want, f"{backend} {label} int64 seed={seed}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("arrow_type", ["string", "large_string", "string_view"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_string_ids_match_xxhash(backend, arrow_type, seed, rng):
    if not hasattr(pa, arrow_type):
        pytest.skip(f"pyarrow {pa.__version__} has no {arrow_type}")
    ids = random_strings(rng, ROWS[backend])
    keys = [s.encode("utf-8") for s in ids]
    # Every path of the algorithm: no stripe and each tail (1-3 bytes, a 4-byte word, 8-byte
    # words), and one or more 32-byte stripes followed by every tail length.
    byte_lengths = np.array([len(k) for k in keys])
    for lo, hi in [(0, 0), (1, 3), (4, 7), (8, 31), (32, 63), (64, 10_000)]:
        assert np.any((byte_lengths >= lo) & (byte_lengths <= hi)), f"no id of {lo}..{hi} bytes"
    assert set(range(32)) <= set((byte_lengths[byte_lengths >= 32] % 32).tolist()), "a tail length is missing"
    arr = pa.array(ids, type=getattr(pa, arrow_type)())
    got = audit_uniform(arr, seed, backend=backend)
    assert_same(got, expected_uniform(keys, seed), f"{backend} {arrow_type} seed={seed}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sliced_arrays_use_their_own_rows(backend, rng):
    ints = random_ints(rng, ROWS[backend])
    strings = random_strings(rng, ROWS[backend])
    for full, keys in [(pa.array(ints), int_keys(ints)), (pa.array(strings), [s.encode() for s in strings]),
                       (pa.array(strings, pa.large_string()), [s.encode() for s in strings])]:
        for _ in range(2 if backend == "triton" else 4):
            start = int(rng.integers(0, len(full)))
            stop = int(rng.integers(start, len(full) + 1))
            got = audit_uniform(full[start:stop], 42, backend=backend)
            assert_same(got, expected_uniform(keys[start:stop], 42), f"{backend} {full.type}[{start}:{stop}]")


def split_points(rng, n: int, parts: int) -> list[int]:
    """Random cut points for ``parts`` batches of ``n`` rows, empty batches included."""
    cuts = np.sort(rng.integers(0, n + 1, size=parts - 1))
    return [0, *cuts.tolist(), n]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_arrays_and_batch_splits_give_the_same_draws(backend, rng):
    strings = random_strings(rng, ROWS[backend])
    ints = random_ints(rng, ROWS[backend])
    for full in [pa.array(ints), pa.array(strings), pa.array(strings).dictionary_encode()]:
        whole = audit_uniform(full, 7, backend=backend)
        cuts = split_points(rng, len(full), 5)
        batches = [full[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        chunked = pa.chunked_array(batches, type=full.type)
        assert_same(audit_uniform(chunked, 7, backend=backend), whole, f"{backend} chunked {full.type}")
        if backend == "triton" and triton_interpreting():
            continue  # the same kernel calls as the chunked array, and slow in the interpreter
        one_by_one = np.concatenate([audit_uniform(batch, 7, backend=backend) for batch in batches])
        assert_same(one_by_one, whole, f"{backend} batches {full.type}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dictionary_ids_hash_their_values(backend, rng):
    pool = random_strings(rng, 120)
    picks = rng.integers(0, len(pool), size=ROWS[backend])
    strings = [pool[i] for i in picks]
    want = expected_uniform([s.encode() for s in strings], 3)
    dictionary = pa.array(strings).dictionary_encode()
    assert_same(audit_uniform(dictionary, 3, backend=backend), want, f"{backend} dictionary<string>")
    # A short slice of a large dictionary (decoded first) and one with its dictionary kept.
    assert_same(audit_uniform(dictionary[5:9], 3, backend=backend), want[5:9], f"{backend} dictionary slice 5:9")
    assert_same(audit_uniform(dictionary[1:], 3, backend=backend), want[1:], f"{backend} dictionary slice 1:")
    large = pa.array(strings, pa.large_string()).dictionary_encode()
    assert_same(audit_uniform(large, 3, backend=backend), want, f"{backend} dictionary<large_string>")
    ints = random_ints(rng, 50)[rng.integers(0, 50, size=ROWS[backend])]
    assert_same(audit_uniform(pa.array(ints).dictionary_encode(), 3, backend=backend),
                expected_uniform(int_keys(ints), 3), f"{backend} dictionary<int64>")


@pytest.mark.parametrize("arrow_type", ["int8", "int16", "int32", "uint8", "uint16", "uint32", "uint64"])
def test_narrower_integer_types_hash_as_int64(arrow_type, rng):
    info = np.iinfo(np.dtype(arrow_type))
    hi = min(int(info.max), 2**63 - 1)
    values = rng.integers(int(info.min), hi, size=500, endpoint=True, dtype=np.int64)
    values[:2] = [int(info.min), hi]
    want = expected_uniform(int_keys(values), 11)
    typed = values.astype(arrow_type)
    assert_same(audit_uniform(pa.array(typed), 11), want, f"Arrow {arrow_type}")
    assert_same(audit_uniform(typed, 11), want, f"numpy {arrow_type}")


def test_every_backend_gives_identical_bits(rng):
    ints = random_ints(rng, 257)
    strings = random_strings(rng, 257)
    inputs = {
        "int64": pa.chunked_array([ints[:100], ints[100:]]),
        "string": pa.array(strings)[3:],
        "large_string": pa.array(strings, pa.large_string()),
    }
    for label, ids in inputs.items():
        results = {name: audit_uniform(ids, 2**64 - 1, backend=name) for name in CPU_BACKENDS}
        first = CPU_BACKENDS[0]
        for name, got in results.items():
            assert_same(got, results[first], f"{label}: {name} vs {first}")


def test_outputs_are_numpy_float64_on_the_cpu_and_empty_inputs_work(rng):
    ids = random_ints(rng, 20)
    for given in [ids, torch.from_numpy(ids), pa.array(ids)]:
        got = audit_uniform(given, 5, device="cpu")
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (20,)
    for empty in [pa.array([], pa.int64()), pa.array([], pa.string()), pa.chunked_array([], pa.string()),
                  np.empty(0, np.int64), pa.array([], pa.string()).dictionary_encode()]:
        got = audit_uniform(empty, 5)
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (0,), f"{empty!r}"


# ---------------------------------------------------------------------------------------------
# Reproducibility across processes


def test_another_process_draws_the_same_bits(tmp_path, rng):
    ints = random_ints(rng, 5000)
    strings = random_strings(rng, 5000)
    table = pa.table({"int_id": ints, "str_id": strings})
    with pa.OSFile(str(tmp_path / "ids.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1234)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import pyarrow as pa
        from hitl_triage.kernels.audit import audit_uniform

        folder = sys.argv[1]
        table = pa.ipc.open_file(folder + "/ids.arrow").read_all()
        np.save(folder + "/int.npy", audit_uniform(table["int_id"], 2**64 - 5))
        np.save(folder + "/str.npy", audit_uniform(table["str_id"], 2**64 - 5))
        """
    )
    # Another hash randomisation for Python's own str hashing: the draw must not depend on it.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, ids in [("int", pa.array(ints)), ("str", pa.array(strings))]:
        here = audit_uniform(ids, 2**64 - 5)
        assert_same(np.load(tmp_path / f"{name}.npy"), here, f"{name} ids, other process")


# ---------------------------------------------------------------------------------------------
# Uniformity

# Each statistical check below fails a truly uniform, independent draw with probability at most
# ALPHA; the inputs are fixed, so the tests are deterministic, and ALPHA is small enough that a
# pass is not luck while a biased draw (lost bits, a float32 on the way, a weak mix of sequential
# ids) moves every statistic by many standard deviations.
ALPHA = 1e-6
N_DRAWS = 200_000


def uniformity_inputs():
    """Sequential ids, the common real-world pattern and the hardest for a weak hash."""
    sequential = np.arange(N_DRAWS, dtype=np.int64)
    return {
        "sequential int64": pa.array(sequential),
        "sequential strings": pa.array([f"pred-{i}" for i in range(N_DRAWS)]),
    }


@pytest.mark.parametrize("label", ["sequential int64", "sequential strings"])
def test_draws_are_uniform(label):
    u = audit_uniform(uniformity_inputs()[label], 20240601)
    assert np.all((u >= 0) & (u < 1)), f"{label}: draws outside [0, 1)"
    scaled = u * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled)), f"{label}: draws are not multiples of 2**-53"

    # Kolmogorov-Smirnov against U(0, 1): kstwo is the exact distribution of the statistic D
    # for n draws, so D above its 1 - ALPHA quantile has probability ALPHA under uniformity
    # (about 0.006 for 200k draws).
    d = stats.kstest(u, "uniform").statistic
    d_limit = stats.kstwo.isf(ALPHA, N_DRAWS)
    assert d < d_limit, f"{label}: KS statistic {d:.5f} >= {d_limit:.5f}"

    # An audit rate of 1%: the number sampled is Binomial(n, 0.01); the interval holds all but
    # ALPHA of its mass. The lowest bit of the 53 is checked the same way (Binomial(n, 0.5)).
    checks = [("below 0.01", int(np.sum(u < 0.01)), 0.01), ("lowest bit set", int(np.sum(scaled % 2 == 1)), 0.5)]
    for name, count, p in checks:
        lo, hi = stats.binom.interval(1 - ALPHA, N_DRAWS, p)
        assert lo <= count <= hi, f"{label}: {count} draws {name}, expected {lo:.0f}..{hi:.0f} of {N_DRAWS}"


def test_seeds_give_independent_draws():
    ids = uniformity_inputs()["sequential int64"]
    a, b = audit_uniform(ids, 0), audit_uniform(ids, 1)
    # Pearson's r of independent uniforms is about N(0, 1/n); the bound is its two-sided
    # 1 - ALPHA quantile.
    r = np.corrcoef(a, b)[0, 1]
    limit = stats.norm.isf(ALPHA / 2) / np.sqrt(N_DRAWS)
    assert abs(r) < limit, f"seeds 0 and 1: correlation {r:.5f}, expected |r| < {limit:.5f}"


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "ids, nulls",
    [
        (pa.array([1, None, 3, None], pa.int64()), 2),
        (pa.array(["a", None, "c"]), 1),
        (pa.chunked_array([pa.array(["a", None]), pa.array([None, "d"])]), 2),
        (pa.array(["a", None, "a"]).dictionary_encode(), 1),
        # Valid indices that point at a null dictionary entry are null ids too.
        (pa.DictionaryArray.from_arrays(pa.array([0, 1, 1, 0], pa.int32()), pa.array(["a", None])), 2),
    ],
    ids=["int64", "string", "chunked", "dictionary-index", "dictionary-value"],
)
def test_null_ids_are_refused_with_their_count(ids, nulls):
    with pytest.raises(ValueError, match=rf"\bid\b.*found {nulls} null"):
        audit_uniform(ids, 0)


@pytest.mark.parametrize(
    "ids",
    [pa.array([1.5, 2.0]), np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), pa.array([True, False]),
     pa.array([b"x"]), np.array(["a", "b"]), ["a", "b"], pa.array([1.0]).dictionary_encode()],
    ids=["arrow-float", "numpy-float", "torch-float", "arrow-bool", "arrow-binary", "numpy-str", "list",
         "dictionary-float"],
)
def test_non_integer_non_string_ids_are_refused(ids):
    with pytest.raises(TypeError, match=r"\bid\b: expected"):
        audit_uniform(ids, 0)


def test_uint64_ids_above_int64_max_are_refused():
    too_big = np.array([5, 2**63], dtype=np.uint64)
    for ids in [pa.array(too_big), too_big, pa.chunked_array([pa.array(too_big[:1]), pa.array(too_big[1:])])]:
        with pytest.raises(ValueError, match=r"\bid\b.*9223372036854775808 > 2\*\*63 - 1"):
            audit_uniform(ids, 0)


@pytest.mark.parametrize(
    "seed, error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_bad_seeds_are_refused(seed, error):
    with pytest.raises(error, match=r"seed: expected an int in \[0, 2\*\*64\)"):
        audit_uniform(pa.array([1, 2]), seed)


def test_numpy_uint64_seed_is_accepted(rng):
    ids = random_ints(rng, 10)
    assert_same(audit_uniform(ids, np.uint64(2**64 - 1)), expected_uniform(int_keys(ids), 2**64 - 1), "np.uint64 seed")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corrupt_string_offsets_raise_instead_of_reading_out_of_bounds(backend):
    # Offsets that run backwards pass pyarrow's cheap validation but would make a row of -5 bytes.
    offsets = pa.py_buffer(np.array([0, 8, 3, 10], dtype=np.int32).tobytes())
    corrupt = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"0123456789")])
    with pytest.raises(ValueError, match=r"\bid\b: expected string offsets within the data buffer"):
        audit_uniform(corrupt, 0, backend=backend)


def test_shapes_devices_and_backends_are_checked():
    with pytest.raises(ValueError, match=r"\bid\b: expected a 1-D array"):
        audit_uniform(np.zeros((2, 2), np.int64), 0)
    with pytest.raises(ValueError, match=r"device: expected None, 'cpu' or 'cuda'"):
        audit_uniform(np.zeros(2, np.int64), 0, device="mps")
    with pytest.raises(BackendUnavailable, match="unknown"):
        audit_uniform(np.zeros(2, np.int64), 0, backend="nope")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA device"):
            audit_uniform(np.zeros(2, np.int64), 0, device="cuda")


def test_environment_variable_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("HITL_TRIAGE_AUDIT_BACKEND", "no-such-backend")
    with pytest.raises(BackendUnavailable, match="HITL_TRIAGE_AUDIT_BACKEND"):
        audit_uniform(np.zeros(2, np.int64), 0)
    monkeypatch.setenv("HITL_TRIAGE_AUDIT_BACKEND", "reference")
    assert_same(audit_uniform(np.zeros(2, np.int64), 0), expected_uniform(int_keys([0, 0]), 0), "env reference")


# ---------------------------------------------------------------------------------------------
# Triton: compiled for the GPU (here without one), and on a real device


def test_triton_kernels_compile_for_hopper():
    """Compile every Triton kernel for sm_90 (H100/H200) with Triton's bundled ptxas. The
    interpreter that runs the other tests here never lowers to PTX, so type errors in uint64
    arithmetic that only the compiler sees would otherwise wait for a GPU."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from hitl_triage.kernels.audit import triton_gpu as tg

        target = GPUTarget("cuda", 90, 32)
        common = {"seed_ptr": "*i64", "out_ptr": "*fp64", "BLOCK": "constexpr"}
        strings = dict(common, data_ptr="*u8", base="i64", n_data="i64")
        cases = [
            (tg._uniform_ints_kernel, dict(common, values_ptr="*i64", n_rows="i32"), tg.INT_BLOCK),
            (tg._uniform_strings_kernel, dict(strings, offsets_ptr="*i32", n_rows="i32"), tg.STR_BLOCK),
            (tg._uniform_strings_kernel, dict(strings, offsets_ptr="*i64", n_rows="i64"), tg.STR_BLOCK),
        ]
        for fn, signature, block in cases:
            order = list(fn.arg_names)
            signature = {name: signature[name] for name in order}
            compiled = triton.compile(ASTSource(fn, signature, {"BLOCK": block}), target=target)
            assert compiled.asm["cubin"], fn
        print("compiled", len(cases))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if "ImportError" in done.stderr and "ASTSource" in done.stderr:
        pytest.skip("this Triton has no ASTSource API for offline compilation")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 3" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
def test_triton_on_cuda_matches_numba(seed, rng):
    n = 1_000_003
    ints = random_ints(rng, n)
    strings = pa.array([f"pred-{i:09d}-{'x' * int(k)}" for i, k in enumerate(rng.integers(0, 70, size=n))])
    cases = [
        ("arrow int64", pa.array(ints)), ("cuda tensor", torch.from_numpy(ints).cuda()), ("string", strings),
        ("sliced string", strings[17:]), ("dictionary", strings[:1000].dictionary_encode()),
    ]
    for label, ids in cases:
        got = audit_uniform(ids, seed, device="cuda", backend="triton")
        assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.float64, label
        want = audit_uniform(ids.cpu() if isinstance(ids, torch.Tensor) else ids, seed, backend="numba")
        assert_same(got.cpu().numpy(), want, f"triton cuda {label} seed={seed}")
    assert audit_uniform(torch.from_numpy(ints[:10]).cuda(), seed).is_cuda, "a CUDA tensor's draws stay on CUDA"


def test_triton_backend_is_exercised_without_cuda():
    # Without CUDA the triton backend runs under the interpreter; were it missing from the CPU
    # backends, every parametrized test above would silently leave it out.
    if not HAS_CUDA:
        assert triton_interpreting() and "triton" in CPU_BACKENDS
