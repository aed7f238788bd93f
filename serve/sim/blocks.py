"""Row blocks of a simulated fleet: the rows of one file stream, generated block by block from the
latent world (:mod:`.world`), with their truth (label, kind, whether the ensemble is wrong).

- **Out-of-distribution rows** (label -1 in the truth): ``unseen_class`` inputs come from
  ``unseen_classes`` extra class means that point partly out of the class subspace; ``corrupted``
  inputs are in-distribution embeddings rescaled by a random factor and buried in heavy isotropic
  noise (a dirty lens, a broken sensor). A base share ``ood_share`` of all rows, plus a burst on
  one source during a time window (``burst_*``).
- **Drift.** On one source, from ``drift_start`` (a fraction of the day) on, every class mean moves
  linearly in time along its own direction, reaching ``drift_strength`` class separations at the
  end of the day. Those rows keep their true label; their kind is ``drift``.
- **Traffic.** Sources are ranked by traffic, source s carrying a share proportional to
  ``1 / (s + 1) ** traffic_skew``; ``review_share`` of the rows fall in the mandatory-review
  categories (``review_categories``), the rest in ``default_category``; timestamps increase through
  one day starting at ``day_start`` (calibration data covers the day before).

Every block of :data:`~.config.GENERATION_BLOCK_ROWS` rows draws from its own generator, derived
from (seed, file stream, block index), so a block is the same whoever asks for it.

Internal to :mod:`hitl_triage.serve.sim`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import (CORRUPTED, DAY_MS, DRIFT, GENERATION_BLOCK_ROWS, IN_DISTRIBUTION, STREAM_CALIBRATION,
                     STREAM_FLEET, UNSEEN, FleetConfig, parse_day_start)
from .world import build_world


@dataclass
class Rows:
    """One block of generated rows, numpy arrays of length n."""

    index: np.ndarray  # int64 row index within the file
    source: np.ndarray  # int32 source code
    category: np.ndarray  # int8 category code
    ts_ms: np.ndarray  # int64 milliseconds since the epoch
    label: np.ndarray  # int32 true class (-1 for OOD)
    kind: np.ndarray  # int8 code into KINDS
    embedding: np.ndarray  # [n, D] float32
    logits: np.ndarray  # [n, M * C] float32
    is_error: np.ndarray  # bool


def _block_rng(config: FleetConfig, stream: int, block: int) -> np.random.Generator:
    # SFC64: the fastest of numpy's bit generators for normals (about 2x PCG64 here), and
    # statistically sound for simulation.
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(config.seed, spawn_key=(stream, block))))


def generate_block(config: FleetConfig, stream: int, block: int, total: int) -> Rows:
    """Rows [block * B, min((block + 1) * B, total)) of a file stream (B = GENERATION_BLOCK_ROWS).

    The draws happen in a fixed order with sizes that depend only on the block, so a block is the
    same whoever asks for it."""
    world = build_world(config)
    rng = _block_rng(config, stream, block)
    start = block * GENERATION_BLOCK_ROWS
    stop = min(start + GENERATION_BLOCK_ROWS, total)
    n = stop - start
    index = np.arange(start, stop, dtype=np.int64)

    # Fraction of the day at which each row arrives (rows are evenly spread through the day).
    day = index.astype(np.float64) / total
    day_start = parse_day_start(config.day_start)
    if stream == STREAM_CALIBRATION:
        day_start -= DAY_MS  # calibration data: the day before
    ts_ms = day_start + (index * DAY_MS) // total

    source = np.searchsorted(world.source_cdf, rng.random(n), side="right").astype(np.int32)
    np.minimum(source, config.sources - 1, out=source)  # cdf[-1] may round below 1
    u_category = rng.random(n)
    category = np.zeros(n, dtype=np.int8)
    if config.review_categories:
        is_review = u_category < config.review_share
        which = (u_category / max(config.review_share, 1e-300) * len(config.review_categories)).astype(np.int64)
        category[is_review] = 1 + np.minimum(which[is_review], len(config.review_categories) - 1)
    label = np.searchsorted(world.class_cdf, rng.random(n), side="right").astype(np.int32)
    np.minimum(label, config.classes - 1, out=label)

    u_ood = rng.random(n)
    u_unseen = rng.random(n)
    kind = np.full(n, IN_DISTRIBUTION, dtype=np.int8)
    drift_amount = None
    if stream == STREAM_FLEET:
        ood_share = np.full(n, config.ood_share)
        in_burst = (
            (source == config.effective_burst_source)
            & (day >= config.burst_start)
            & (day < config.burst_end)
            & (config.burst_ood_share > 0)
        )
        ood_share[in_burst] = config.burst_ood_share
        is_ood = u_ood < ood_share
        unseen = np.where(in_burst, config.burst_kind == "unseen_class", u_unseen < config.unseen_fraction)
        kind[is_ood & unseen] = UNSEEN
        kind[is_ood & ~unseen] = CORRUPTED
        if config.drift_strength > 0:
            drifting = (source == config.effective_drift_source) & (day > config.drift_start) & ~is_ood
            kind[drifting] = DRIFT
            drift_amount = ((day - config.drift_start) / (1.0 - config.drift_start)).astype(np.float32)

    # Embeddings: class (or unseen class) mean + noise in the class and nuisance subspaces. All
    # rows draw the same numbers whatever their kind, so the kinds only change what is added.
    # Logits are the heads applied to the embedding; the heads are linear, so they are built from
    # the same parts (noise through noise_heads, a per-class table for the means) at a quarter of
    # the multiply-adds of embedding @ heads. Only corrupted rows, whose noise spans all D
    # dimensions, go through the full product.
    coords = rng.standard_normal((n, world.noise_basis.shape[0]), dtype=np.float32)
    embedding = coords @ world.noise_basis
    logits = coords @ world.noise_heads
    unseen_rows = np.flatnonzero(kind == UNSEEN)
    unseen_pick = rng.integers(0, world.unseen_means.shape[0], size=n)
    centre = world.class_means[label]
    centre_logits = world.class_logits[label]
    if unseen_rows.size:
        centre[unseen_rows] = world.unseen_means[unseen_pick[unseen_rows]]
        centre_logits[unseen_rows] = world.unseen_logits[unseen_pick[unseen_rows]]
    embedding += centre
    logits += centre_logits
    drift_rows = np.flatnonzero(kind == DRIFT)
    if drift_rows.size:
        assert drift_amount is not None  # DRIFT rows exist only when the drift amounts were drawn
        amount = drift_amount[drift_rows, None]
        embedding[drift_rows] += amount * world.drift_shift[label[drift_rows]]
        logits[drift_rows] += amount * world.drift_logits[label[drift_rows]]
    corrupted_rows = np.flatnonzero(kind == CORRUPTED)
    if corrupted_rows.size:
        low, high = config.corruption_scale
        factor = np.exp(rng.uniform(math.log(low), math.log(high), size=corrupted_rows.size)).astype(np.float32)
        noise = rng.standard_normal((corrupted_rows.size, config.dim), dtype=np.float32)
        noise *= np.float32(config.corruption_noise)
        embedding[corrupted_rows] = embedding[corrupted_rows] * factor[:, None] + noise
        logits[corrupted_rows] = embedding[corrupted_rows] @ world.heads + world.biases

    label[kind == UNSEEN] = -1
    label[kind == CORRUPTED] = -1
    is_error = _ensemble_errors(logits, label, config.members, config.classes)
    return Rows(index, source, category, ts_ms, label, kind, embedding, logits, is_error)


def _ensemble_errors(logits: np.ndarray, label: np.ndarray, members: int, classes: int) -> np.ndarray:
    """``argmax_c mean_m softmax(z_m)_c != label`` per row (True wherever label is -1).

    logits: [n, M * C] float32. Computed in float32 for speed; rows whose top two mean
    probabilities are within float32 rounding of each other are redone in float64, so the answer
    is the one an exact computation gives (lowest class index on exact ties, as np.argmax)."""
    n = logits.shape[0]
    # Work on a [M, C, n] copy: numpy reduces over a short last axis (C = 10) an order of magnitude
    # slower than it runs elementwise over long rows, and the transposed copy costs one pass.
    zt = np.ascontiguousarray(logits.reshape(n, members, classes).transpose(1, 2, 0))
    e = zt - zt.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    total = e.sum(axis=1, keepdims=True)
    np.reciprocal(total, out=total)
    e *= total
    p = e.sum(axis=0)  # [C, n]: M times the mean, which has the same argmax
    best = p[0].copy()
    second = np.full(n, -np.inf, dtype=p.dtype)
    predicted = np.zeros(n, dtype=np.int64)
    for c in range(1, classes):
        higher = p[c] > best
        np.maximum(second, np.where(higher, best, p[c]), out=second)
        predicted[higher] = c
        np.maximum(best, p[c], out=best)
    close = np.flatnonzero(best - second < 1e-4 * members)
    if close.size:
        z64 = logits[close].reshape(-1, members, classes).astype(np.float64)
        z64 -= z64.max(axis=2, keepdims=True)
        p64 = np.exp(z64)
        p64 /= p64.sum(axis=2, keepdims=True)
        predicted[close] = np.argmax(p64.mean(axis=1), axis=1)
    return (predicted != label) | (label < 0)
