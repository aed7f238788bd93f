"""Input factories shared by the runner (``python -m bench``) and the pytest-benchmark suites.

Every factory draws fresh random data from the seed it is given (never zeros: they hide wrong
indexing and can run faster than real data). Shapes are arguments, never constants here; the
suites decide them.

- :func:`make_logits`: ensemble logits [B, M, C] with a spread of confidences.
- :func:`make_triage_data`: a labelled, clustered world with ground truth (true class, OOD flag),
  from which logits of a small overconfident ensemble and embeddings are derived, so calibration,
  OOD scoring and escalation quality can be measured on one data set. It stands in for the fleet
  simulator (``hitl_triage.serve.sim``) where that is not available.
- :func:`to_arrow`: the same data as an Arrow table in the data contract (Parquet-ready).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Largest signal-pass input the factories will make at once (elements), so a sweep over C=1000
# cannot ask for tens of GB by accident: a 1M x 10 x 1000 float32 tensor would be 40 GB.
MAX_ELEMENTS = 400_000_000


def rows_for(members: int, classes: int, rows: int, max_elements: int) -> int:
    """``rows``, lowered so that rows x members x classes stays within ``max_elements``."""
    return max(1, min(rows, max_elements // (members * classes)))


def make_logits(rows: int, members: int, classes: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Logits [rows, members, classes] of ``dtype``: a class signal shared by the members (so the
    ensemble mostly agrees) plus member noise, at a per-row scale spread over 0.3..6 so confidence
    runs from near-uniform to near-certain. Drawn in float32 (fast), then cast."""
    n = rows * members * classes
    if n > MAX_ELEMENTS:
        raise ValueError(f"rows x members x classes: expected at most {MAX_ELEMENTS}, found {n}")
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((rows, 1, classes), dtype=np.float32)
    z = rng.standard_normal((rows, members, classes), dtype=np.float32)
    z *= 0.5
    z += shared
    z *= rng.uniform(0.3, 6.0, size=(rows, 1, 1)).astype(np.float32)
    return z.astype(dtype, copy=False)


def make_logits_torch(rows: int, members: int, classes: int, dtype="float32", device="cpu", seed: int = 0):
    """:func:`make_logits`'s distribution drawn directly on ``device`` with torch (a GPU benchmark
    of 10M rows should not spend its time generating on the host and copying)."""
    import torch

    n = rows * members * classes
    if n > MAX_ELEMENTS:
        raise ValueError(f"rows x members x classes: expected at most {MAX_ELEMENTS}, found {n}")
    g = torch.Generator(device=device).manual_seed(seed)
    shared = torch.randn((rows, 1, classes), generator=g, device=device)
    z = torch.randn((rows, members, classes), generator=g, device=device)
    z.mul_(0.5).add_(shared)
    z.mul_(torch.rand((rows, 1, 1), generator=g, device=device) * 5.7 + 0.3)
    return z.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


@dataclasses.dataclass
class TriageData:
    """A labelled data set with ground truth.

    ``ids`` int64 [N]; ``logits`` float32 [N, M, C]; ``embedding`` float32 [N, D] (not normalised);
    ``label`` int32 [N], the true class, -1 on out-of-distribution rows; ``is_ood`` bool [N];
    ``source`` str [N] (a few fleet members). ``origin`` names where the data came from.
    """

    ids: np.ndarray
    logits: np.ndarray
    embedding: np.ndarray
    label: np.ndarray
    is_ood: np.ndarray
    source: np.ndarray
    origin: str = "synthetic clustered set (bench.factories)"

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows) -> "TriageData":
        rows = np.asarray(rows)
        return TriageData(
            self.ids[rows], self.logits[rows], self.embedding[rows], self.label[rows],
            self.is_ood[rows], self.source[rows], self.origin,
        )

    @property
    def predicted(self) -> np.ndarray:
        """The ensemble-mean prediction at temperature 1 (argmax of the mean softmax)."""
        z = self.logits - self.logits.max(axis=2, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=2, keepdims=True)
        return p.mean(axis=1).argmax(axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class World:
    """The fixed part of the synthetic world: where classes live and the ensemble's weights."""

    basis: np.ndarray    # [LATENT, D] orthonormal rows: the subspace the classes live in
    centres: np.ndarray  # [C, LATENT] class centres in that subspace
    weights: np.ndarray  # [M, C, LATENT] each member's class directions (the centres, perturbed)
    bias: np.ndarray     # [M, C]
    sharpness: float     # logit scale: large makes the ensemble overconfident


LATENT = 16


def make_world(members: int, classes: int, dim: int, seed: int = 0, sharpness: float = 3.0) -> World:
    """Class centres at distance ~``2 sqrt(LATENT/2)`` apart in a ``LATENT``-dimensional subspace
    of the embedding space (real embeddings are low-rank too); each member of the ensemble sees the
    centres with its own perturbation (norm ~1), so the members disagree most between classes."""
    rng = np.random.default_rng(seed)
    latent = min(LATENT, dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    centres = rng.standard_normal((classes, latent))
    weights = centres[None] + rng.standard_normal((members, classes, latent)) / np.sqrt(latent)
    bias = 0.2 * rng.standard_normal((members, classes))
    return World(basis.T.astype(np.float32), centres.astype(np.float32), weights.astype(np.float32),
                 bias.astype(np.float32), sharpness)


def make_triage_data(
    rows: int,
    members: int = 5,
    classes: int = 10,
    dim: int = 128,
    *,
    ood_fraction: float = 0.1,
    seed: int = 0,
    world_seed: int = 1234,
    sources: int = 8,
    noise: float = 1.0,
) -> TriageData:
    """Rows drawn from a clustered world (the same ``world_seed`` gives the same world, so a bank,
    a calibration set and a test set can be drawn from one world with different ``seed``).

    In-distribution rows: a latent point = centre of the true class + Gaussian noise of standard
    deviation ``noise`` per latent axis (neighbouring classes overlap, so the ensemble errs on some
    rows), mapped into the D-dimensional embedding space, plus a little isotropic noise.
    Out-of-distribution rows sit between two classes (a random mixture of two centres) with the same
    noise: near the data and hard to tell apart, as PERF-NOTES describes. Member m's logits are
    ``sharpness * <w_mc, latent> + b_mc``; the large sharpness makes the ensemble overconfident,
    which temperature scaling should correct.
    """
    world = make_world(members, classes, dim, world_seed)
    latent = world.centres.shape[1]
    rng = np.random.default_rng(seed)
    is_ood = rng.random(rows) < ood_fraction
    label = rng.integers(0, classes, size=rows).astype(np.int32)
    other = (label + rng.integers(1, classes, size=rows)) % classes
    mix = rng.uniform(0.35, 0.65, size=(rows, 1)).astype(np.float32)
    centre = world.centres[label]
    between = mix * centre + (1 - mix) * world.centres[other]
    point = np.where(is_ood[:, None], between, centre)
    point = point + noise * rng.standard_normal((rows, latent), dtype=np.float32)
    embedding = point @ world.basis
    embedding += (0.1 * noise) * rng.standard_normal((rows, dim), dtype=np.float32)
    logits = np.einsum("nl,mcl->nmc", point, world.weights, optimize=True) * world.sharpness + world.bias[None]
    label = np.where(is_ood, -1, label).astype(np.int32)
    ids = np.arange(rows, dtype=np.int64) + np.int64(seed) * 10_000_000_000
    source = np.array([f"site-{i}" for i in range(sources)])[rng.integers(0, sources, size=rows)]
    return TriageData(ids, logits.astype(np.float32), embedding.astype(np.float32), label, is_ood, source)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), as every k-NN method here compares them."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def to_arrow(data: TriageData, *, with_label: bool = False, with_embedding: bool = True):
    """A pyarrow Table in the data contract: id int64, logits fixed_size_list<fixed_size_list<
    float32>[C]>[M], embedding fixed_size_list<float32>[D], source string (and label int32)."""
    import pyarrow as pa

    n, members, classes = data.logits.shape
    flat = pa.array(np.ascontiguousarray(data.logits, dtype=np.float32).reshape(-1))
    logits = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, classes), members)
    columns = {"id": pa.array(data.ids), "logits": logits}
    if with_embedding:
        emb = np.ascontiguousarray(data.embedding, dtype=np.float32)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    columns["source"] = pa.array(data.source.astype(str), pa.string())
    if with_label:
        columns["label"] = pa.array(data.label, pa.int32())
    return pa.table(columns)


def bank_table(embedding: np.ndarray):
    """A bank as the engine takes it: a table with one ``embedding`` column."""
    import pyarrow as pa

    emb = np.ascontiguousarray(embedding, dtype=np.float32)
    return pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])})


# -- the fleet simulator, with the synthetic set as a stand-in -----------------------------------


@dataclasses.dataclass
class FleetData:
    """Fleet predictions with ground truth, labelled calibration rows and a reference bank, as
    Arrow tables in the data contract (what ``triage fit`` / ``triage run`` read) and as arrays.

    ``logits`` float32 [N, M, C], ``embedding`` float32 [N, D], ``is_ood`` / ``is_error`` bool [N]
    (``is_error``: the ensemble's prediction is wrong; True on every OOD row), ``label`` int32 [N]
    (-1 on OOD rows); ``calibration_logits`` [Nc, M, C] and ``calibration_labels`` [Nc];
    ``bank_embedding`` float32 [Nb, D]. ``origin`` says which generator made them.
    """

    fleet: object
    calibration: object
    bank: object
    logits: np.ndarray
    embedding: np.ndarray
    label: np.ndarray
    is_ood: np.ndarray
    is_error: np.ndarray
    calibration_logits: np.ndarray
    calibration_labels: np.ndarray
    bank_embedding: np.ndarray
    origin: str


def fixed_list_values(column, *shape: int) -> np.ndarray:
    """The float values of a (nested) fixed-size-list column as an array [N, *shape] (zero-copy
    where Arrow allows)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column
    for _ in shape:
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def fleet_data(
    rows: int,
    *,
    bank_rows: int,
    calibration_rows: int,
    members: int = 5,
    classes: int = 10,
    dim: int = 128,
    seed: int = 0,
    **fleet_overrides,
) -> FleetData:
    """Data from ``hitl_triage.serve.sim`` (``FleetConfig(**fleet_overrides)``), or, where the
    fleet simulator is not installed, from :func:`make_triage_data` (``ood_share`` carried over)."""
    import pyarrow as pa

    try:
        from hitl_triage.serve.sim import (
            FleetConfig,
            generate_bank_batches,
            generate_calibration_batches,
            generate_fleet_with_truth,
        )
    except ImportError as exc:
        return _synthetic_fleet(rows, bank_rows, calibration_rows, members, classes, dim, seed,
                                fleet_overrides.get("ood_share", 0.1), f"synthetic clustered set (fleet simulator: {exc})")
    config = FleetConfig(rows=rows, bank_rows=bank_rows, calibration_rows=calibration_rows, members=members,
                         classes=classes, dim=dim, seed=seed, **fleet_overrides)
    pairs = list(generate_fleet_with_truth(config, batch_rows=min(max(rows, 1), 262_144)))
    fleet = pa.Table.from_batches([p[0] for p in pairs])
    truth = pa.Table.from_batches([p[1] for p in pairs])
    calibration = pa.Table.from_batches(list(generate_calibration_batches(config))) if calibration_rows else None
    bank = pa.Table.from_batches(list(generate_bank_batches(config))) if bank_rows else None
    return FleetData(
        fleet=fleet, calibration=calibration, bank=bank,
        logits=fixed_list_values(fleet.column("logits"), members, classes),
        embedding=fixed_list_values(fleet.column("embedding"), dim),
        label=truth.column("label").to_numpy(),
        is_ood=truth.column("is_ood").to_numpy(zero_copy_only=False),
        is_error=truth.column("is_error").to_numpy(zero_copy_only=False),
        calibration_logits=fixed_list_values(calibration.column("logits"), members, classes) if calibration is not None else np.empty((0, members, classes), np.float32),
        calibration_labels=calibration.column("label").to_numpy() if calibration is not None else np.empty(0, np.int32),
        bank_embedding=fixed_list_values(bank.column("embedding"), dim) if bank is not None else np.empty((0, dim), np.float32),
        origin=f"fleet simulator (hitl_triage.serve.sim, seed {seed}"
        + "".join(f", {k}={v}" for k, v in fleet_overrides.items()) + ")",
    )


def _synthetic_fleet(rows, bank_rows, calibration_rows, members, classes, dim, seed, ood_share, origin) -> FleetData:
    test = make_triage_data(rows, members, classes, dim, ood_fraction=ood_share, seed=3 * seed + 1)
    calib = make_triage_data(max(calibration_rows, 1), members, classes, dim, ood_fraction=0.0, seed=3 * seed + 2)
    bank = make_triage_data(max(bank_rows, 1), members, classes, dim, ood_fraction=0.0, seed=3 * seed + 3)
    is_error = (test.predicted != test.label) | test.is_ood
    return FleetData(
        fleet=to_arrow(test), calibration=to_arrow(calib, with_label=True), bank=bank_table(bank.embedding),
        logits=test.logits, embedding=test.embedding, label=test.label, is_ood=test.is_ood, is_error=is_error,
        calibration_logits=calib.logits, calibration_labels=calib.label, bank_embedding=bank.embedding,
        origin=origin,
    )
