"""Shared helpers of the engine tests (profiles, calibration, thresholds, policy, audit, CLI).

Everything here is an *independent* reference: plain numpy float64 re-statements of DESIGN.md and
of the documented rules (``engine/policy.py``'s docstring, ``engine/audit.py``'s), the ``xxhash``
package for the audit draw, brute-force k-NN in numpy. None of it imports the code under test,
apart from the data contract's column builders being plain pyarrow.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import xxhash

# Reason bits as DESIGN.md lists them (restated, not imported, so a renumbering is caught).
CONFIDENCE, DISAGREEMENT, POLICY, ANOMALY, AUDIT, REPORTED, KNOWN_EDGE_CASE = 1, 2, 4, 8, 16, 32, 64
BITS = {"confidence": CONFIDENCE, "disagreement": DISAGREEMENT, "policy": POLICY, "anomaly": ANOMALY,
        "audit": AUDIT, "reported": REPORTED, "known_edge_case": KNOWN_EDGE_CASE}

# The decision columns DESIGN.md promises ("Output decisions ... at least"), with their types.
DESIGN_COLUMNS = {
    "escalate": pa.bool_(),
    "reason_mask": pa.uint8(),
    "tier": pa.string(),
    "priority": pa.float32(),
    "predicted_class": pa.int32(),
    "confidence": pa.float32(),
    "margin": pa.float32(),
    "mutual_info": pa.float32(),
    "vote_agreement": pa.float32(),
    "ood_score": pa.float32(),
    "audit_weight": pa.float32(),
    "profile_version": pa.string(),
}


# ------------------------------------------------------------------------------------------------
# Data in the contract
# ------------------------------------------------------------------------------------------------


def contract_table(ids, logits, *, embedding=None, source=None, category=None, label=None,
                   embedding_null=None, logits_null=None) -> pa.Table:
    """A pyarrow table in the data contract: logits [N, M, C] as nested fixed-size lists,
    embedding [N, D] as a fixed-size list; ``*_null`` bool [N] marks whole entries null."""
    logits = np.asarray(logits, dtype=np.float32)
    n, members, classes = logits.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), classes)
    outer = pa.FixedSizeListArray.from_arrays(inner, members,
                                              mask=None if logits_null is None else pa.array(logits_null))
    columns = {"id": pa.array(ids), "logits": outer}
    if embedding is not None:
        embedding = np.asarray(embedding, dtype=np.float32)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(embedding.reshape(-1)), embedding.shape[1],
            mask=None if embedding_null is None else pa.array(embedding_null))
    if source is not None:
        columns["source"] = pa.array(source, pa.string())
    if category is not None:
        columns["category"] = pa.array(category, pa.string())
    if label is not None:
        columns["label"] = pa.array(label, pa.int32())
    return pa.table(columns)


def _children(array: pa.FixedSizeListArray) -> pa.Array:
    """The child values of a fixed-size-list array, null entries included (``flatten`` drops
    them), honouring the array's offset."""
    size = array.type.list_size
    return array.values.slice(array.offset * size, len(array) * size)


def logits_of(table) -> np.ndarray:
    """float32 [N, M, C] from a table's nested fixed-size-list ``logits`` column (null entries
    come back as whatever values they hold)."""
    column = table.column("logits").combine_chunks()
    members = column.type.list_size
    classes = column.type.value_type.list_size
    values = _children(_children(column))
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), members, classes)


def embedding_of(table) -> np.ndarray:
    """float32 [N, D] from a table's fixed-size-list ``embedding`` column."""
    column = table.column("embedding").combine_chunks()
    values = _children(column).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(len(column), column.type.list_size)


def column(table, name) -> np.ndarray:
    """A column of a table or record batch as numpy (nulls as None or NaN)."""
    values = table.column(name)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------------------------------
# A known model: overconfident ensemble whose true posterior is known row by row
# ------------------------------------------------------------------------------------------------


def known_ensemble(rng, rows: int, *, members: int = 5, classes: int = 6, overconfidence: float = 3.0,
                   spread: float = 2.5, member_noise: float = 0.3):
    """Rows drawn from a model whose truth is known exactly.

    True logits ``z`` [N, C] ~ N(0, spread^2); the true posterior is ``softmax(z)`` and each label
    is drawn from it. Member m reports ``overconfidence * (z + member_noise * eps_m)``: every
    member is the true model, sharpened by ``overconfidence`` (so the right temperature is about
    ``overconfidence``) and perturbed a little (so members disagree). Returns
    (logits float32 [N, M, C], labels int64 [N], true posterior float64 [N, C]).
    """
    z = rng.normal(0.0, spread, (rows, classes))
    posterior = softmax(z)
    labels = (posterior.cumsum(axis=1) < rng.random((rows, 1))).sum(axis=1)
    labels = np.minimum(labels, classes - 1)  # cumsum rounding may leave the last edge below 1
    noise = rng.normal(0.0, member_noise, (rows, members, classes))
    logits = overconfidence * (z[:, None, :] + noise)
    return logits.astype(np.float32), labels.astype(np.int64), posterior


# ------------------------------------------------------------------------------------------------
# Independent signal references (numpy float64)
# ------------------------------------------------------------------------------------------------


def softmax(z, axis=-1):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def signals_np(logits, temperature):
    """DESIGN.md's signals in numpy float64 for finite rows: dict of predicted_class, confidence,
    margin, mutual_info, vote_agreement; ``temperature`` a scalar or a per-row array [N]."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (z.shape[0],))
    p_m = softmax(z / t[:, None, None], axis=2)
    p = p_m.mean(axis=1)
    predicted = p.argmax(axis=1)
    top2 = -np.sort(-p, axis=1)[:, :2]

    def entropy(q):
        return -(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)).sum(axis=-1)

    mutual_info = np.maximum(entropy(p) - entropy(p_m).mean(axis=1), 0.0)
    votes = (z.argmax(axis=2) == predicted[:, None]).mean(axis=1)
    return {"predicted_class": predicted, "confidence": top2[:, 0], "margin": top2[:, 0] - top2[:, 1],
            "mutual_info": mutual_info, "vote_agreement": votes, "probabilities": p}


def ece_np(confidence, correct, bins: int = 15) -> float:
    """Expected calibration error, ``bins`` equal-width bins of the top-label confidence."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            total += abs(confidence[chosen].mean() - correct[chosen].mean()) * chosen.sum()
    return total / len(confidence)


def kth_distance_np(queries, bank, k: int) -> np.ndarray:
    """Brute-force distance to the k-th nearest L2-normalised bank vector (NaN for zero rows)."""
    q = np.asarray(queries, dtype=np.float64)
    b = np.asarray(bank, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    d2 = np.maximum(2.0 - 2.0 * (q @ b.T), 0.0)
    return np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])


def audit_uniform_np(ids) -> callable:
    """The audit draw restated from DESIGN.md / kernels/audit/reference.py's docstring with the
    ``xxhash`` package: (XXH64(id bytes, seed) >> 11) * 2**-53, ints as 8 little-endian bytes."""

    def draw(seed: int) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.float64)
        for i, value in enumerate(ids):
            data = int(value).to_bytes(8, "little", signed=True) if isinstance(value, (int, np.integer)) \
                else str(value).encode()
            out[i] = (xxhash.xxh64_intdigest(data, seed) >> 11) * 2.0**-53
        return out

    return draw


# ------------------------------------------------------------------------------------------------
# The documented rules, restated in numpy (engine/policy.py's module docstring, DESIGN.md)
# ------------------------------------------------------------------------------------------------


def expected_rules(decisions: pa.Table | pa.RecordBatch, profile, category=None, *, reported: bool = False):
    """(reason_mask uint8 [N], tier name or None [N], priority float64 [N]) recomputed from the
    decisions' signal columns, the input's categories and the profile's thresholds and rules
    (``reported``: users reported every row, as the service's Report call says)."""
    col = {name: np.asarray(decisions.column(name).to_numpy(zero_copy_only=False)) for name in
           ("confidence", "mutual_info", "vote_agreement", "ood_score", "audit_weight", "valid",
            "predicted_class")}
    th = profile.thresholds
    cfg = profile.config
    n = len(col["confidence"])
    conf = col["confidence"].astype(np.float64)
    mi = col["mutual_info"].astype(np.float64)
    vote = col["vote_agreement"].astype(np.float64)
    ood = col["ood_score"].astype(np.float64)
    cannot = ~col["valid"].astype(bool)
    cats = np.array([None] * n, dtype=object) if category is None else np.asarray(category, dtype=object)

    # Confidence threshold of each row: per-class table or global, never below the category floor.
    if th.per_class_confidence is not None:
        table = np.asarray(th.per_class_confidence, dtype=np.float64)
        t_conf = np.where(col["predicted_class"] >= 0, table[np.clip(col["predicted_class"], 0, None)],
                          table[0])
    else:
        t_conf = np.full(n, th.confidence, dtype=np.float64)
    floors = np.array([cfg.policy.category_min_confidence.get(c, 0.0) if c is not None else 0.0 for c in cats])
    t_conf = np.maximum(t_conf, floors)
    t_conf32 = t_conf.astype(np.float32).astype(np.float64)  # the engine compares in float32

    low_conf = (conf < t_conf32) | cannot  # NaN confidence (unscoreable) never passes
    if profile.members > 1:
        high_mi = mi > np.float32(th.mutual_info)
        low_vote = vote < np.float32(th.vote_floor)
        disagreement = high_mi | low_vote | cannot
    else:
        high_mi = low_vote = disagreement = np.zeros(n, dtype=bool)
    policy = np.array([c in cfg.policy.mandatory_categories for c in cats])
    has_bank = profile.bank is not None
    missing_embedding = np.isnan(ood) & has_bank
    anomaly = ((ood > np.float32(th.ood)) | missing_embedding) if has_bank else np.zeros(n, dtype=bool)
    audit = col["audit_weight"] > 0

    users = np.full(n, reported)
    mask = (low_conf * CONFIDENCE | disagreement * DISAGREEMENT | policy * POLICY | anomaly * ANOMALY
            | audit * AUDIT | users * REPORTED).astype(np.uint8)

    order = list(cfg.tiers.order)
    rank = {name: i for i, name in enumerate(order)}
    tier = np.full(n, -1)
    for fired, name in ((audit, cfg.tiers.audit), (low_conf, cfg.tiers.confidence),
                        (disagreement, cfg.tiers.disagreement), (anomaly, cfg.tiers.anomaly),
                        (policy, cfg.tiers.policy), (users, cfg.tiers.reported),
                        (cannot | missing_embedding, cfg.tiers.invalid)):
        tier = np.where(fired, np.maximum(tier, rank[name]), tier)
    cat_rank = np.array([rank[cfg.policy.category_tier[c]] if c in cfg.policy.category_tier else -1 for c in cats])
    tier = np.where(mask > 0, np.maximum(tier, cat_rank), tier)
    tier_names = np.array([order[r] if r >= 0 else None for r in tier], dtype=object)

    # Priority: the largest severity among fired reasons.
    severity = np.zeros(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf_sev = np.clip((t_conf32 - conf) / t_conf32, 0, 1)
        severity = np.where(low_conf & ~cannot, np.maximum(severity, np.nan_to_num(conf_sev)), severity)
        if profile.members > 1:
            mi_max = math.log(min(profile.members, profile.classes))
            span = max(mi_max - th.mutual_info, 1e-6) if math.isfinite(th.mutual_info) else 1.0
            mi_sev = np.nan_to_num(np.clip((mi - th.mutual_info) / span, 0, 1))
            mi_sev = np.where(low_vote & ~high_mi, 1.0, mi_sev)
            severity = np.where(disagreement, np.maximum(severity, mi_sev), severity)
        if has_bank and math.isfinite(th.ood):
            ood_sev = np.nan_to_num(np.clip((ood - th.ood) / th.ood, 0, 1))
            severity = np.where(anomaly, np.maximum(severity, ood_sev), severity)
    policy_priority = np.array([cfg.policy.category_priority.get(c, 0.5) for c in cats])
    severity = np.where(policy, np.maximum(severity, policy_priority), severity)
    severity = np.where(users, np.maximum(severity, 0.9), severity)  # a user's challenge: 0.9
    severity = np.where(cannot | missing_embedding, 1.0, severity)
    return mask, tier_names, severity


# ------------------------------------------------------------------------------------------------
# Running things
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads. Why: training the tiny digits MLPs with two OpenMP
    threads on the shared 2-core machine took 45 s a member against 0.8 s with one (the threads
    spin-wait for each other when the cores are busy); the matrices are too small to gain."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=4)
def fleet_tables(rows: int, *, seed: int = 0, dim: int = 16, calibration_rows: int = 8000, bank_rows: int = 2000,
                 sources: int = 4):
    """A small simulated fleet in memory (fleet, truth, calibration, bank tables), made once per
    process and shared by the test modules (the simulator is deterministic per seed)."""
    from hitl_triage.serve.sim import (FleetConfig, generate_bank_batches, generate_calibration_batches,
                                       generate_fleet_with_truth)

    config = FleetConfig(rows=rows, seed=seed, dim=dim, calibration_rows=calibration_rows, bank_rows=bank_rows,
                         sources=sources)
    pairs = list(generate_fleet_with_truth(config, batch_rows=rows))
    fleet = pa.Table.from_batches([p[0] for p in pairs])
    truth = pa.Table.from_batches([p[1] for p in pairs])
    calibration = pa.Table.from_batches(list(generate_calibration_batches(config)))
    bank = pa.Table.from_batches(list(generate_bank_batches(config)))
    return fleet, truth, calibration, bank


def assert_tables_equal(a, b, columns=None):
    """Column by column equality with NaN == NaN and null == null, naming the first difference."""
    names = columns or a.schema.names
    assert a.num_rows == b.num_rows, f"rows: {a.num_rows} != {b.num_rows}"
    for name in names:
        x, y = column(a, name), column(b, name)
        if x.dtype.kind == "f":
            same = (x == y) | (np.isnan(x) & np.isnan(y))
        else:
            same = np.array([u == v for u, v in zip(x, y)], dtype=bool)
        if not same.all():
            first = int(np.argmin(same))
            raise AssertionError(f"column {name!r} differs at row {first}: {x[first]!r} != {y[first]!r} "
                                 f"({int((~same).sum())} rows differ)")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Autouse in the modules that import it: run the engine with one torch thread.

    Why: the engine's policy and audit stages are many small elementwise torch ops; each enters
    an OpenMP parallel region at >= 32k elements, and when the other core of the shared 2-core
    machine is busy every region waits at a barrier. Measured on a 40k-row batch: 1.0-1.5 s with
    two threads against 0.04-0.05 s with one. These tests check results, not speed.
    """
    with torch_threads(1):
        yield
