"""The CPU fast path of an IVF bank (:mod:`hitl_triage.kernels.knn.ivf_cpu`): the batched,
register-blocked scan against an independent float64 search of the same probed lists, its
invariance to threads and sweeps, ties, short lists, adding to list-ordered storage, version 1
directories, memory maps, and nprobe tuning.

Neighbour checks are tie-aware, as in test_knn.py: the rows returned are re-scored in float64 and
must be a true top-k of the probed vectors within the float32 error of a dot product of unit
vectors of dimension D (normalisation and summation: at most (2 D + 8) 2**-24 on the cosine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hitl_triage.engine.bank import load_bank, save_bank, tune_nprobe
from hitl_triage.kernels.knn import KnnIndex, knn_distance, knn_search
from hitl_triage.kernels.knn import ivf_cpu
from hitl_triage.kernels.knn.ivf_cpu import IvfLists, group_by_list, merged_order, search_ivf

U32 = 2.0**-24


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng, n: int, dim: int, classes: int = 6) -> np.ndarray:
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return unit(centres[rng.integers(0, classes, n)] + rng.standard_normal((n, dim)) * (0.7 / np.sqrt(dim)))


def lists_for(rng, x: np.ndarray, nlist: int) -> tuple[np.ndarray, IvfLists, np.ndarray]:
    """Random unit centroids (the scan must not depend on how good they are), rows filed under
    their nearest centroid: (vectors in list order, lists, row ids of that order)."""
    centroids = unit(rng.standard_normal((nlist, x.shape[1])))
    assignment = np.argmax(x.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)
    order, offsets = group_by_list(assignment, nlist)
    return np.ascontiguousarray(x[order]), IvfLists(centroids, offsets), order


def probed_reference(q: np.ndarray, stored: np.ndarray, lists: IvfLists, nprobe: int, k: int):
    """Float64: for each query the top-k similarities among the stored rows of its nprobe lists
    with the largest centroid similarity (-inf padded), and the set of lists probed."""
    q64, x64, c64 = q.astype(np.float64), stored.astype(np.float64), lists.centroids.astype(np.float64)
    probes = np.argsort(-(q64 @ c64.T), axis=1, kind="stable")[:, :nprobe]
    sims = np.full((len(q), k), -np.inf)
    for i, probe in enumerate(probes):
        rows = np.concatenate([np.arange(lists.offsets[p], lists.offsets[p + 1]) for p in probe])
        s = np.sort(x64[rows] @ q64[i])[::-1][:k]
        sims[i, :s.size] = s
    return sims, probes


def check_scan(q, stored, lists, nprobe, k, sims, rows, label):
    dim = q.shape[1]
    tol = (2 * dim + 8) * U32
    ref, probes = probed_reference(q, stored, lists, nprobe, k)
    assert sims.shape == (len(q), k) and rows.shape == (len(q), k), label
    assert sims.dtype == np.float32 and rows.dtype == np.int64, label
    found = rows >= 0
    np.testing.assert_array_equal(found, np.isfinite(ref), err_msg=f"{label}: rows found vs vectors probed")
    with np.errstate(invalid="ignore"):  # -inf - -inf past the rows found
        steps = np.diff(sims, axis=1)
    assert np.all((steps <= 0) | ~found[:, 1:]), f"{label}: not descending"
    list_of = np.searchsorted(lists.offsets, np.where(found, rows, 0), side="right") - 1
    assert all(set(list_of[i][found[i]]) <= set(probes[i]) for i in range(len(q))), f"{label}: a row outside the probed lists"
    true = np.einsum("bd,bkd->bk", q.astype(np.float64), stored.astype(np.float64)[np.where(found, rows, 0)])
    np.testing.assert_allclose(sims[found], true[found], atol=tol, err_msg=f"{label}: similarity vs its row")
    # A true top-k: the re-scored similarities, sorted, match the reference's within tolerance.
    resorted = np.sort(np.where(found, true, -np.inf), axis=1)[:, ::-1]
    np.testing.assert_allclose(resorted[found], ref[found], atol=2 * tol, err_msg=f"{label}: not a top-k")
    assert all(len(set(r[f])) == f.sum() for r, f in zip(rows, found)), f"{label}: repeated rows"


SCAN_CASES = [  # (queries, vectors, D, nlist, nprobe, k): odd sizes, every remainder of the 2x6 block
    (1, 500, 128, 8, 3, 1),
    (3, 701, 128, 16, 4, 10),
    (257, 1999, 130, 32, 5, 50),
    (64, 300, 3, 6, 6, 7),
    (33, 1000, 17, 10, 1, 60),  # one list of ~100: some queries come up short
    (20, 97, 8, 4, 4, 97),  # every list probed, k = N: exact
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "B{}-N{}-D{}-L{}-p{}-k{}".format(*c))
def test_scan_is_exact_within_the_probed_lists(case, rng):
    batch, n, dim, nlist, nprobe, k = case
    x = clustered(rng, n, dim)
    stored, lists, _ = lists_for(rng, x, nlist)
    q = unit(clustered(rng, batch, dim) + 0.3 * rng.standard_normal((batch, dim)))
    sims, rows = search_ivf(q, stored, lists, nprobe, k)
    check_scan(q, stored, lists, nprobe, k, sims, rows, str(case))


def test_empty_lists_and_empty_batch(rng):
    x = clustered(rng, 400, 12)
    stored, lists, _ = lists_for(rng, x, 5)
    # Two extra centroids far from everything: empty lists that queries near them still probe.
    centroids = np.concatenate([lists.centroids, -lists.centroids[:2]])
    lists = IvfLists(centroids, np.concatenate([lists.offsets, [400, 400]]))
    q = unit(np.concatenate([-x[:5], x[:5]]))
    sims, rows = search_ivf(q, stored, lists, 3, 8)
    check_scan(q, stored, lists, 3, 8, sims, rows, "empty lists")
    sims, rows = search_ivf(q[:0], stored, lists, 3, 8)
    assert sims.shape == (0, 8) and rows.shape == (0, 8)


def small_sweeps(monkeypatch):
    """Sweeps of 7 to 61 queries: many sweeps per batch, shared between the threads."""
    monkeypatch.setattr(ivf_cpu, "MIN_SWEEP_ROWS", 7)
    monkeypatch.setattr(ivf_cpu, "MAX_SWEEP_ROWS", 61)


def test_results_do_not_depend_on_threads_sweeps_or_batch(rng, monkeypatch):
    """Bit-identical results: a query's similarities and rows never depend on which queries share
    its sweep, nor on how many threads share the sweeps."""
    x = clustered(rng, 3001, 64)
    stored, lists, _ = lists_for(rng, x, 24)
    q = unit(clustered(rng, 1501, 64))
    reference = search_ivf(q, stored, lists, 5, 9, threads=1)
    small_sweeps(monkeypatch)
    assert ivf_cpu.sweep_rows(1501, 2) == 61 and ivf_cpu.sweep_rows(20, 3) == 7
    for threads in (1, 2, 3):
        sims, rows = search_ivf(q, stored, lists, 5, 9, threads=threads)
        np.testing.assert_array_equal(sims, reference[0])
        np.testing.assert_array_equal(rows, reference[1])
    for i in (0, 17, 1500):  # alone, every query is the odd one out in every list it probes
        sims, rows = search_ivf(q[i:i + 1], stored, lists, 5, 9)
        np.testing.assert_array_equal(sims[0], reference[0][i])
        np.testing.assert_array_equal(rows[0], reference[1][i])


@pytest.mark.parametrize("with_head", [False, True], ids=["plain", "head"])
def test_tied_neighbours_go_to_the_lower_row_whatever_the_threads(with_head, rng, monkeypatch):
    """Every vector stored three times (in three lists' worth of positions): each query's
    neighbours tie in threes, and the heaps keep the lowest rows of each tie, in order, whatever
    the threads and sweeps."""
    base = low_rank(rng, 300, 32, 8)
    x = np.concatenate([base, base, base])
    centroids = unit(rng.standard_normal((3, 32)))
    lists = IvfLists(centroids, np.array([0, 300, 600, 900]))  # three lists, one copy each
    q = unit(base[:40] + 0.05 * rng.standard_normal((40, 32)))
    head = head_scan(x, q) if with_head else None
    small_sweeps(monkeypatch)
    one = search_ivf(q, x, lists, 3, 6, threads=1, head=head)
    three = search_ivf(q, x, lists, 3, 6, threads=3, head=head)
    np.testing.assert_array_equal(three[0], one[0])
    np.testing.assert_array_equal(three[1], one[1])
    sims, rows = one
    # Each tie of three similarities lists its rows ascending; they are copies of one vector.
    assert np.all(sims[:, 0::3] == sims[:, 2::3]), "ties come in threes"
    np.testing.assert_array_equal(rows[:, 1::3] - rows[:, 0::3], np.full((40, 2), 300))
    np.testing.assert_array_equal(rows[:, 2::3] - rows[:, 1::3], np.full((40, 2), 300))


def low_rank(rng, n: int, dim: int, rank: int, classes: int = 6) -> np.ndarray:
    """Clustered unit rows spanning a ``rank``-dimensional subspace (the pre-filter's head)."""
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    centres = rng.standard_normal((classes, rank))
    return unit((centres[rng.integers(0, classes, n)] + 0.6 * rng.standard_normal((n, rank))) @ basis)


def head_scan(stored: np.ndarray, q: np.ndarray):
    from hitl_triage.kernels.knn.exact import build_prefilter, dot_error_bound

    prefilter = build_prefilter(stored)
    assert prefilter.rotation is not None, "the set-up must give the pre-filter a head"
    qh, qt = prefilter.queries(q)
    return ivf_cpu.HeadScan(qh, qt, prefilter.heads, prefilter.tails, prefilter.eps + dot_error_bound(q.shape[1]))


@pytest.mark.parametrize("case", [(1, 500, 64, 8, 3, 1, 8), (257, 1999, 130, 32, 5, 50, 16), (33, 1000, 40, 10, 1, 60, 8),
                                  (70, 3000, 128, 12, 4, 10, 32)],
                         ids=lambda c: "B{}-N{}-D{}-L{}-p{}-k{}-r{}".format(*c))
def test_scan_through_a_head_is_exact_within_the_probed_lists(case, rng):
    """With a pre-filter head only rows that cannot beat a heap's root are skipped: the same
    top-k of the probed lists (queries off the bank's subspace included)."""
    batch, n, dim, nlist, nprobe, k, rank = case
    stored, lists, _ = lists_for(rng, low_rank(rng, n, dim, rank), nlist)
    q = unit(low_rank(rng, batch, dim, rank) + 0.3 * rng.standard_normal((batch, dim)))
    sims, rows = search_ivf(q, stored, lists, nprobe, k, head=head_scan(stored, q))
    check_scan(q, stored, lists, nprobe, k, sims, rows, str(case))


def test_scan_through_a_head_does_not_depend_on_threads_sweeps_or_batch(rng, monkeypatch):
    stored, lists, _ = lists_for(rng, low_rank(rng, 3001, 64, 8), 24)
    q = unit(low_rank(rng, 1501, 64, 8) + 0.05 * rng.standard_normal((1501, 64)))
    head = head_scan(stored, q)
    reference = search_ivf(q, stored, lists, 5, 9, threads=1, head=head)
    small_sweeps(monkeypatch)
    for threads in (1, 2, 3):
        sims, rows = search_ivf(q, stored, lists, 5, 9, threads=threads, head=head)
        np.testing.assert_array_equal(sims, reference[0])
        np.testing.assert_array_equal(rows, reference[1])
    for i in (0, 17, 1500):
        one = ivf_cpu.HeadScan(head.qh[i:i + 1], head.qt[i:i + 1], head.heads, head.tails, head.eps)
        sims, rows = search_ivf(q[i:i + 1], stored, lists, 5, 9, head=one)
        np.testing.assert_array_equal(sims[0], reference[0][i])
        np.testing.assert_array_equal(rows[0], reference[1][i])


@pytest.mark.parametrize("dim", [3, 128, 257])
def test_flat_search_does_not_depend_on_the_batch(rng, dim):
    """The exact flat search (FAISS candidates re-scored in float64) gives a row the same bits
    alone, among 6 (FAISS's per-vector loop), among 1000 (its BLAS path) and in the whole batch;
    the k-th distance equals a float64 search within float32 rounding of the distance."""
    bank = KnnIndex.build(unit(rng.standard_normal((2500, dim))), kind="flat")
    q = unit(rng.standard_normal((2001, dim)))
    whole = np.asarray(knn_distance(q, bank, 7))
    for size in (1, 6, 1000):
        parts = np.concatenate([np.asarray(knn_distance(q[i:i + size], bank, 7)) for i in range(0, 60 if size == 1 else 2001, size)])
        np.testing.assert_array_equal(parts, whole[:parts.size], err_msg=f"batches of {size}")
    sims = np.sort(q.astype(np.float64) @ bank.vectors.astype(np.float64).T, axis=1)[:, -7]
    exact = np.sqrt(np.maximum(2 - 2 * sims, 0))
    # the engine re-normalises rows in float32: cosine error c <= (2 D + 8) 2^-24 (module
    # docstring), and d^2 = 2 - 2 cos gives |d' - d| <= min(sqrt(2 c), 2 c / d); plus the float32
    # rounding of d
    c = (2 * dim + 8) * U32
    bound = np.minimum(np.sqrt(2 * c), 2 * c / np.maximum(exact, 1e-30)) + 2 * U32 * exact
    assert (np.abs(whole - exact) <= bound).all(), np.max(np.abs(whole - exact) / bound)


def test_flat_search_breaks_ties_by_row(rng):
    """Duplicated vectors: the ids come back in ascending order among equal similarities."""
    base = unit(rng.standard_normal((50, 16)))
    bank = KnnIndex.build(np.concatenate([base, base, base]), kind="flat")
    _, ids = knn_search(base[:4], bank, 3)
    np.testing.assert_array_equal(np.asarray(ids), np.arange(4)[:, None] + np.array([0, 50, 100]))


def test_worker_errors_reach_the_caller(rng, monkeypatch):
    x = clustered(rng, 200, 8)
    stored, lists, _ = lists_for(rng, x, 4)
    small_sweeps(monkeypatch)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(ivf_cpu, "_ivf_sweep", broken)
    with pytest.raises(RuntimeError, match="boom"):
        search_ivf(unit(x[:100]), stored, lists, 2, 3, threads=2)


def test_merged_order_equals_grouping_the_concatenation(rng):
    nlist = 9
    old = rng.integers(0, nlist, 500)
    new = rng.integers(0, nlist, 77)
    new[:5] = 3  # several new rows in one list, and lists that get none
    order, offsets = group_by_list(old, nlist)
    old_pos, new_pos, new_offsets = merged_order(offsets, new)
    both_order, both_offsets = group_by_list(np.concatenate([old, new]), nlist)
    np.testing.assert_array_equal(new_offsets, both_offsets)
    placed = np.empty(577, dtype=np.int64)
    placed[old_pos] = order  # stored row j of the old layout holds id order[j]
    placed[new_pos] = 500 + np.arange(77)
    np.testing.assert_array_equal(placed, both_order)


def test_ivf_add_equals_filing_everything_under_the_same_centroids(rng):
    x = clustered(rng, 4000, 24)
    index = KnnIndex.build(x[:3000], kind="ivf", nlist=16, nprobe=4)
    index.add(x[3000:3001])
    index.add(torch.from_numpy(x[3001:]).double())
    assert index.ntotal == 4000 and index.nbytes == 4000 * 24 * 4 + 4000 * 8 + 16 * 24 * 4 + 17 * 8
    np.testing.assert_allclose(index.vectors, x, atol=1e-7)
    # The same lists as filing all 4000 rows under the trained centroids at once.
    assignment = np.argmax(x.astype(np.float64) @ index.lists.centroids.T, axis=1)
    _, offsets = group_by_list(assignment, 16)
    np.testing.assert_array_equal(index.lists.offsets, offsets)
    q = unit(clustered(rng, 300, 24))
    d, ids = knn_search(q, index, 12)
    d_stored, rows = search_ivf(q, index.host_unit(), index.lists, index.search_nprobe(12), 12)
    np.testing.assert_allclose(d, np.sqrt(np.maximum(2 - 2 * d_stored, 0)), atol=1e-6)
    np.testing.assert_array_equal(index.vectors[ids], index.host_unit()[rows])


def test_ivf_probing_every_list_is_exact(rng):
    x = clustered(rng, 2500, 32)
    q = unit(clustered(rng, 200, 32))
    index = KnnIndex.build(x, kind="ivf", nlist=20)
    index.nprobe = index.nlist
    d_ivf, i_ivf = knn_search(q, index, 10, backend="ivf")
    d_flat, i_flat = knn_search(q, KnnIndex.build(x, kind="flat"), 10, backend="faiss")
    np.testing.assert_allclose(d_ivf, d_flat, atol=2e-6)
    assert (np.sort(i_ivf, axis=1) == np.sort(i_flat, axis=1)).mean() > 0.999  # ties aside


def test_memory_mapped_ivf_searches_like_in_memory(rng, tmp_path):
    x = clustered(rng, 3000, 16)
    q = unit(clustered(rng, 100, 16))
    index = KnnIndex.build(x, kind="ivf", nprobe=3)
    save_bank(index, tmp_path / "bank")
    mapped = load_bank(tmp_path / "bank", mmap=True)
    assert isinstance(mapped.host_unit(), np.memmap) or isinstance(mapped.host_unit().base, np.memmap)
    for backend in ("ivf", "faiss", "torch"):
        np.testing.assert_array_equal(knn_search(q, mapped, 7, backend=backend)[1], knn_search(q, index, 7, backend=backend)[1])


def test_version_1_ivf_directory_loads(rng, tmp_path):
    """A bank saved before format 2: id-ordered vectors beside a FAISS IndexIVFFlat. Its lists
    are read back from the FAISS file, so searches equal FAISS's own IVF search."""
    import faiss

    x = clustered(rng, 2000, 20)
    q = unit(clustered(rng, 150, 20))
    ivf = faiss.index_factory(20, "IVF12,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    faiss.write_index(ivf, str(tmp_path / "ivf.faiss"))
    np.save(tmp_path / "vectors.npy", x)
    meta = {"format": "hitl-triage-knn-index", "version": 1, "kind": "ivf", "dim": 20, "ntotal": 2000,
            "nlist": 12, "nprobe": 3, "dtype": "float32", "normalised": True}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = load_bank(tmp_path)
    assert (loaded.kind, loaded.nlist, loaded.nprobe, loaded.ntotal) == ("ivf", 12, 3, 2000)
    np.testing.assert_array_equal(loaded.vectors, x)
    d, ids = knn_search(q, loaded, 5, backend="ivf")
    sims, expected = ivf.search(q, 5, params=faiss.SearchParametersIVF(nprobe=3))
    np.testing.assert_allclose(d, np.sqrt(np.maximum(2 - 2 * sims, 0)), atol=2e-6)
    assert (np.sort(ids, axis=1) == np.sort(expected, axis=1)).mean() > 0.999  # ties aside
    save_bank(loaded, tmp_path)  # rewritten as version 2 in place
    assert json.loads((tmp_path / "meta.json").read_text())["version"] == 2 and not (tmp_path / "ivf.faiss").exists()
    np.testing.assert_array_equal(knn_search(q, load_bank(tmp_path), 5, backend="ivf")[1], ids)


def test_load_refuses_inconsistent_ivf_files(rng, tmp_path):
    save_bank(KnnIndex.build(clustered(rng, 500, 8), kind="ivf", nlist=5), tmp_path)
    np.save(tmp_path / "offsets.npy", np.array([0, 100, 50, 300, 400, 500]))
    with pytest.raises(ValueError, match=r"offsets.npy: expected non-decreasing offsets from 0 to 500"):
        load_bank(tmp_path)
    np.save(tmp_path / "offsets.npy", np.arange(5))
    with pytest.raises(ValueError, match=r"offsets.npy: expected int64 \(6,\), found int64 \(5,\)"):
        load_bank(tmp_path)
    (tmp_path / "row_ids.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"row_ids.npy: expected a saved array, found no such file"):
        load_bank(tmp_path)


def test_tune_nprobe_finds_the_smallest_passing_value(rng):
    """The error only falls as nprobe grows; the tuned value passes and the one below fails."""
    x = clustered(rng, 6000, 32, classes=4)
    calibration = unit(clustered(rng, 600, 32, classes=4))
    index = KnnIndex.build(x, kind="ivf", nlist=64)
    exact = knn_distance(calibration, KnnIndex.build(x, kind="flat"), 5)

    # The hard rows, restated: midpoints of random pairs of the calibration rows (bank.hard_rows).
    pairs = np.random.default_rng(1).integers(0, 600, (2, 300))
    mid = calibration[pairs[0]].astype(np.float64) + calibration[pairs[1]]
    hard = mid[(pairs[0] != pairs[1]) & (np.linalg.norm(mid, axis=1) > 1e-3)].astype(np.float32)
    exact_hard = knn_distance(hard, KnnIndex.build(x, kind="flat"), 5)

    def bound(nprobe):
        index.nprobe = nprobe
        limits = []
        for rows, ex in ((calibration, exact), (hard, exact_hard)):
            rel = np.abs(knn_distance(rows, index, 5) - ex) / ex
            limits.append(rel.mean() + 2 * rel.std() / np.sqrt(rel.size))
        return max(limits)

    report = tune_nprobe(index, calibration, 5, 0.005)
    assert report["knn_error_hard"] > report["knn_error"], "the midpoints are the harder rows"
    chosen = report["nprobe"]
    assert report["knn_error_bound"] <= 0.005 and report["knn_error"] <= report["knn_error_bound"]
    assert chosen == 1 or bound(chosen - 1) > 0.005
    assert bound(chosen) <= 0.005
    errors = [bound(p) for p in (1, 2, 4, 8, 16, 64)]
    # Probing every list is exact up to float32 summation order (the scan's against FAISS's).
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6
    with pytest.raises(ValueError, match=r"kind: tune_nprobe needs kind='ivf', found 'flat'"):
        tune_nprobe(KnnIndex.build(x, kind="flat"), calibration, 5, 0.01)


def test_prepare_knn_compiles_ahead(rng):
    from hitl_triage.kernels.knn import prepare_knn

    x = clustered(rng, 300, 8)
    for kind, backend in (("flat", "faiss"), ("ivf", "ivf")):
        assert prepare_knn(KnnIndex.build(x, kind=kind), 5) == backend
    with pytest.raises(TypeError, match="bank: expected a KnnIndex, found ndarray"):
        prepare_knn(x, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_backends_search_an_ivf_index_exactly_by_id(backend, rng):
    """The GPU backends search an IVF index's stored (list-ordered) rows exactly; the ids must
    come back as insertion ids, mapped on the GPU."""
    x = clustered(rng, 5000, 64)
    q = unit(clustered(rng, 300, 64))
    index = KnnIndex.build(x, kind="ivf", nprobe=1)
    d, ids = knn_search(torch.from_numpy(q).cuda(), index, 10, backend=backend)
    assert d.is_cuda and ids.is_cuda
    d_ref, _ = knn_search(q, KnnIndex.build(x, kind="flat"), 10, backend="torch")
    true = np.sqrt(np.maximum(2 - 2 * np.einsum("bd,bkd->bk", q.astype(np.float64), x.astype(np.float64)[ids.cpu().numpy()]), 0))
    # float16 operands on the GPU move a cosine by at most 2 * 2**-11 (test_knn.py), a distance
    # d = sqrt(2 - 2 cos) by at most sqrt(2 * 2 * 2**-11) = 0.044 (the worst case, d near 0)
    np.testing.assert_allclose(np.sort(true, axis=1), d_ref, atol=0.05)
    np.testing.assert_allclose(d.cpu().numpy(), true, atol=0.05)
