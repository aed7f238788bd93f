"""The fleet simulator: realistic synthetic predictions for the demo, the tests and the benchmarks.

A simulated fleet of deployed models (cameras by default) streams one day of predictions. Every
row follows the data contract of DESIGN.md: ``id``, ``logits`` [M, C], ``embedding`` [D],
``source``, ``category``, ``ts``. Beside the fleet file come labelled calibration data, an
in-distribution reference bank and a truth file that only tests and reports read.

The latent world (all of it drawn from the seed):

- **Classes.** C class means in a ``class_dim``-dimensional subspace of the D-dimensional embedding
  space, all about ``class_separation`` within-class standard deviations apart (with some jitter, so
  some class pairs are more confusable than others), and class priors falling off as
  ``1 / (c + 1) ** class_skew``. An input of class y has the embedding
  ``mean_y + class noise (class subspace, std 1) + nuisance noise (nuisance subspace, std
  nuisance_std)``: real embeddings vary along few directions, and the nuisance directions carry no
  class information, only distance.
- **Ensemble.** M members with linear heads on the embedding, shaped like a real deep ensemble:
  every member is sharp, the members agree on easy in-distribution inputs and disagree on hard and
  out-of-distribution ones, and their mean is still overconfident. The shared head is the Bayes
  rule of the in-distribution model (so confidence is meaningful); each member adds its own
  perturbation, small inside the class subspace (the members' class boundaries differ a little, so
  sharp members flip near a boundary: disagreement where the errors are) and large off the data
  manifold, in the directions orthogonal to both the class and the nuisance subspaces. Members
  have learned to ignore the nuisance variation they were trained on, so in-distribution inputs
  never see that large perturbation; unseen classes, corrupted inputs and drifted ones, which
  leave the manifold, do. All logits are multiplied by ``overconfidence``. Because the members
  agree in-distribution, the ensemble mean is close to the Bayes posterior sharpened by that
  factor: overconfident in every confidence bin, which temperature scaling undoes (fitted T a
  little below ``overconfidence``; the ECE falls by an order of magnitude). A perturbation that
  moved in-distribution logits (say along the nuisance directions) would instead flatten the mean
  of the members' softmaxes in the middle confidence range, an underconfidence that one
  temperature cannot fix together with the overconfident top bin.
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

Determinism: rows are generated in fixed blocks of :data:`GENERATION_BLOCK_ROWS`, each from its own
generator derived from (seed, file stream, block index). The data therefore depend only on the
configuration's data fields, never on batch size, row-group size or threading; the file layout
knobs (``row_group_rows``) change the layout, not a single value. Files are byte-identical for
the same configuration on the same platform and library versions; another numpy (whose
generators may change between releases) or another BLAS kernel may change values in the last
bits, never the statistics.

Speed, measured on the shared 2-core VM (M=5, C=10, D=128): about 1.1 us of CPU per row to
generate and 1.6 us to encode and write as Parquet (pyarrow's nested-list encoding is most of it),
the two overlapping on two threads; 10M rows are 7.4 GB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATION_BLOCK_ROWS",
    "KINDS",
    "FleetConfig",
    "FleetFiles",
    "bank_schema",
    "calibration_schema",
    "fleet_paths",
    "fleet_schema",
    "generate_bank_batches",
    "generate_calibration_batches",
    "generate_fleet_batches",
    "generate_fleet_with_truth",
    "simulate_fleet",
    "TRUTH_SCHEMA",
]

#: Rows per generation block. Part of the data's definition: every block draws from its own
#: generator, so changing this changes the data (and nothing else does, apart from the config).
GENERATION_BLOCK_ROWS = 16_384

#: The truth file's ``kind`` values, in code order.
KINDS = ("in_distribution", "unseen_class", "corrupted", "drift")
_IN_DISTRIBUTION, _UNSEEN, _CORRUPTED, _DRIFT = range(4)

#: One simulated day, in milliseconds.
DAY_MS = 86_400_000

# Independent random streams: the latent world, then one per file. Part of the data's definition.
_STREAM_WORLD, _STREAM_FLEET, _STREAM_CALIBRATION, _STREAM_BANK = range(4)

# Parquet key-value metadata key under which each file records the configuration that made it.
METADATA_KEY = b"hitl_triage.fleet"

TRUTH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("is_ood", pa.bool_(), nullable=False),
        pa.field("is_error", pa.bool_(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class FleetConfig:
    """Everything that defines a simulated fleet. Every knob has a default that makes a realistic day.

    Shares and time points are fractions (of rows, of the day); lengths are in the embedding's own
    units, where the within-class standard deviation in the class subspace is 1.
    """

    # --- size and shape -------------------------------------------------------------------------
    rows: int = 1_000_000
    """Fleet predictions in the day."""
    sources: int = 8
    """Deployed model instances (``cam-000`` ... by default), ranked by traffic."""
    seed: int = 0
    """Seed of everything (>= 0). The same seed and configuration give the same files."""
    members: int = 5
    """Ensemble members M."""
    classes: int = 10
    """Classes C."""
    dim: int = 128
    """Embedding dimension D."""
    calibration_rows: int = 20_000
    """Labelled in-distribution rows of the calibration file (the day before)."""
    bank_rows: int = 20_000
    """In-distribution embeddings of the reference bank."""

    # --- the in-distribution world --------------------------------------------------------------
    class_dim: int = 16
    """Dimensions of the subspace that holds the class means and the class noise (capped at D)."""
    nuisance_dim: int = 16
    """Dimensions of within-class nuisance variation, orthogonal to the class subspace (capped)."""
    class_separation: float = 3.9
    """Typical distance between two class means, in within-class standard deviations. Sets the
    error rate: 10.6-13.6% of in-distribution rows at 3.9 with the other defaults (seeds 0-11),
    and with it how much the overconfident ensemble's ECE has to gain from a temperature."""
    class_jitter: float = 0.25
    """Random displacement of each class mean, relative to its norm: unequal confusability."""
    class_skew: float = 0.5
    """Class prior exponent: class c has prior proportional to 1 / (c + 1) ** class_skew."""
    nuisance_std: float = 1.0
    """Standard deviation of the nuisance noise per nuisance dimension."""

    # --- the ensemble ---------------------------------------------------------------------------
    overconfidence: float = 2.5
    """Factor on every logit (each member is the Bayes rule sharpened by it). 1 gives a calibrated
    ensemble up to the members' disagreement; above 1 the ensemble mean is overconfident and
    temperature scaling fits T a little below this factor. With the defaults (seeds 0-11, 20k
    calibration rows): fitted T 2.43-2.49, top-label ECE (15 bins) 0.063-0.080 at T = 1 and
    0.004-0.006 at the fitted T."""
    member_spread: float = 0.1
    """Size of each member's head perturbation inside the class subspace, relative to the head:
    how far the members' class boundaries differ. Larger values add disagreement on in-distribution
    inputs and flatten the ensemble mean (less overconfidence for a temperature to fix)."""
    member_spread_outside: float = 1.5
    """Size of each member's head perturbation off the data manifold (orthogonal to the class and
    nuisance subspaces), relative to the head: disagreement on inputs that leave the manifold (OOD,
    drift). No effect when the class and nuisance subspaces fill all D dimensions."""

    # --- out-of-distribution inputs -------------------------------------------------------------
    ood_share: float = 0.02
    """Base share of out-of-distribution rows on every source."""
    unseen_fraction: float = 0.5
    """Fraction of the base OOD rows that come from unseen classes (the rest are corrupted)."""
    unseen_classes: int = 3
    """Number of unseen class means."""
    unseen_offset: float = 0.6
    """Norm of an unseen class mean's component outside the class subspace, in class separations."""
    corruption_noise: float = 0.6
    """Per-dimension standard deviation of the isotropic noise of a corrupted input."""
    corruption_scale: tuple[float, float] = (0.25, 4.0)
    """Range of the log-uniform factor that rescales a corrupted input."""
    burst_source: int | None = None
    """Source index of the OOD burst; None picks source 1 (source 0 when there is only one)."""
    burst_start: float = 0.55
    """Start of the burst, as a fraction of the day."""
    burst_end: float = 0.60
    """End of the burst (exclusive), as a fraction of the day."""
    burst_ood_share: float = 0.4
    """Share of the burst source's rows inside the window that are OOD (0 disables the burst)."""
    burst_kind: str = "corrupted"
    """Kind of the burst's OOD rows: "corrupted" (a faulty sensor) or "unseen_class"."""

    # --- drift ----------------------------------------------------------------------------------
    drift_source: int | None = None
    """Source index whose inputs drift; None picks source 2 (the last one when there are fewer)."""
    drift_start: float = 0.25
    """When the drift starts, as a fraction of the day."""
    drift_strength: float = 1.0
    """How far each class mean has moved at the end of the day, in class separations (0: none)."""

    # --- traffic and policy ---------------------------------------------------------------------
    traffic_skew: float = 1.0
    """Source traffic exponent: source s carries a share proportional to 1 / (s + 1) ** skew."""
    review_share: float = 0.03
    """Share of rows in the mandatory-review categories."""
    review_categories: tuple[str, ...] = ("medical", "legal")
    """Mandatory-review categories, equally likely among the review rows."""
    default_category: str = "general"
    """Category of every other row."""
    source_prefix: str = "cam"
    """Source names are ``{prefix}-{index:03d}``; ids are ``{source}-{row:09d}``."""
    day_start: str = "2025-06-02T00:00:00+00:00"
    """Start of the simulated day (ISO 8601; a naive time is taken as UTC)."""

    # --- file layout (never changes the data) ---------------------------------------------------
    row_group_rows: int = 131_072
    """Rows per Parquet row group: also the unit of memory held while writing."""

    def __post_init__(self) -> None:
        _check_int(self, "rows", 1)
        _check_int(self, "sources", 1)
        _check_int(self, "seed", 0)
        _check_int(self, "members", 1)
        _check_int(self, "classes", 2)
        _check_int(self, "dim", 2)
        _check_int(self, "calibration_rows", 0)
        _check_int(self, "bank_rows", 0)
        _check_int(self, "class_dim", 1)
        _check_int(self, "nuisance_dim", 0)
        _check_int(self, "unseen_classes", 1)
        _check_int(self, "row_group_rows", 1)
        for name in ("class_separation", "overconfidence", "corruption_noise"):
            _check_float(self, name, low=0.0, low_open=True)
        for name in ("class_jitter", "class_skew", "nuisance_std", "member_spread",
                     "member_spread_outside", "unseen_offset", "drift_strength", "traffic_skew"):
            _check_float(self, name, low=0.0)
        for name in ("ood_share", "unseen_fraction", "burst_ood_share", "review_share",
                     "burst_start", "burst_end", "drift_start"):
            _check_float(self, name, low=0.0, high=1.0)
        if not self.burst_start < self.burst_end:
            raise ValueError(
                f"burst_start/burst_end: expected burst_start < burst_end, found "
                f"{self.burst_start} and {self.burst_end}"
            )
        if self.drift_start >= 1.0:
            raise ValueError(f"drift_start: expected a fraction of the day below 1, found {self.drift_start}")
        low, high = self.corruption_scale
        if not 0 < low <= high:
            raise ValueError(f"corruption_scale: expected 0 < low <= high, found {self.corruption_scale}")
        if self.burst_kind not in ("corrupted", "unseen_class"):
            raise ValueError(f"burst_kind: expected 'corrupted' or 'unseen_class', found {self.burst_kind!r}")
        for name in ("burst_source", "drift_source"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.sources):
                raise ValueError(f"{name}: expected None or a source index in [0, {self.sources}), found {value!r}")
        if not self.review_categories and self.review_share > 0:
            raise ValueError("review_categories: expected at least one category when review_share > 0, found none")
        if self.default_category in self.review_categories:
            raise ValueError(
                f"default_category: expected a category outside review_categories "
                f"{self.review_categories}, found {self.default_category!r}"
            )
        _parse_day_start(self.day_start)

    @property
    def effective_burst_source(self) -> int:
        """The burst's source index once the default is resolved."""
        return self.burst_source if self.burst_source is not None else min(1, self.sources - 1)

    @property
    def effective_drift_source(self) -> int:
        """The drifting source's index once the default is resolved."""
        return self.drift_source if self.drift_source is not None else min(2, self.sources - 1)

    @property
    def source_names(self) -> list[str]:
        """Source names, index order (= traffic rank)."""
        width = max(3, len(str(self.sources - 1)))
        return [f"{self.source_prefix}-{s:0{width}d}" for s in range(self.sources)]

    @property
    def categories(self) -> list[str]:
        """Category names, code order: the default category first."""
        return [self.default_category, *self.review_categories]

    def to_json(self) -> str:
        """The configuration as JSON (recorded in every file's Parquet metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class FleetFiles:
    """Where :func:`simulate_fleet` wrote the four files."""

    fleet: Path
    """Predictions: id, logits, embedding, source, category, ts."""
    calibration: Path
    """Labelled in-distribution predictions: the fleet's columns + label."""
    bank: Path
    """In-distribution reference embeddings: id, embedding, label."""
    truth: Path
    """What really happened to each fleet row: id, label, is_ood, is_error, kind."""

    def __iter__(self):
        return iter((self.fleet, self.calibration, self.bank, self.truth))


# ------------------------------------------------------------------------------------------------
# Schemas and paths


def fleet_schema(config: FleetConfig) -> pa.Schema:
    """The fleet file's schema: the data contract with M, C and D fixed."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("logits", pa.list_(pa.list_(pa.float32(), config.classes), config.members), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), config.dim), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("category", pa.string(), nullable=False),
            pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        ]
    )


def calibration_schema(config: FleetConfig) -> pa.Schema:
    """The calibration file's schema: the fleet's columns plus ``label`` (int32)."""
    return fleet_schema(config).append(pa.field("label", pa.int32(), nullable=False))


def bank_schema(config: FleetConfig) -> pa.Schema:
    """The bank file's schema: id, embedding [D], label (int32)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), config.dim), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
        ]
    )


def fleet_paths(out_path: str | Path) -> FleetFiles:
    """The four file names for ``out_path``: FLEET.parquet and, beside it, FLEET.calibration.parquet,
    FLEET.bank.parquet and FLEET.truth.parquet."""
    out = Path(out_path)
    stem = out.with_suffix("") if out.suffix == ".parquet" else out
    fleet = out if out.suffix == ".parquet" else out.with_name(out.name + ".parquet")
    return FleetFiles(
        fleet=fleet,
        calibration=stem.with_name(stem.name + ".calibration.parquet"),
        bank=stem.with_name(stem.name + ".bank.parquet"),
        truth=stem.with_name(stem.name + ".truth.parquet"),
    )


# ------------------------------------------------------------------------------------------------
# The latent world


@dataclass(frozen=True)
class _World:
    """Everything drawn once per seed. Row-major float32 arrays, shapes in the names' comments."""

    class_means: np.ndarray  # [C, D]
    class_cdf: np.ndarray  # [C] float64, cumulative class prior
    noise_basis: np.ndarray  # [r + k, D]: class rows then nuisance rows scaled by nuisance_std
    unseen_means: np.ndarray  # [U, D]
    drift_shift: np.ndarray  # [C, D]: class mean displacement at full drift
    heads: np.ndarray  # [D, M * C]: member heads side by side, logits = x @ heads + biases
    biases: np.ndarray  # [M * C]
    noise_heads: np.ndarray  # [r + k, M * C] = noise_basis @ heads
    class_logits: np.ndarray  # [C, M * C] = class_means @ heads + biases
    unseen_logits: np.ndarray  # [U, M * C] = unseen_means @ heads + biases
    drift_logits: np.ndarray  # [C, M * C] = drift_shift @ heads
    source_cdf: np.ndarray  # [S] float64, cumulative traffic share


@functools.lru_cache(maxsize=8)
def _world(config: FleetConfig) -> _World:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(config.seed, spawn_key=(_STREAM_WORLD,))))
    d, c, m = config.dim, config.classes, config.members
    r = min(config.class_dim, d)
    k = min(config.nuisance_dim, d - r)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    basis = rotation.T  # rows: an orthonormal basis of R^D in random orientation
    class_basis, nuisance_basis, outside_basis = basis[:r], basis[r : r + k], basis[r:]

    # Class means: as close to equidistant as the class subspace allows, then jittered so that
    # some pairs are more confusable than others. Equidistant orthonormal directions scaled by
    # sep/sqrt(2) are sep apart.
    scale = config.class_separation / math.sqrt(2.0)
    if r >= c:
        directions = np.linalg.qr(rng.standard_normal((r, c)))[0].T  # [C, r] orthonormal rows
    else:
        directions = rng.standard_normal((c, r))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    jitter = rng.standard_normal((c, r)) * (config.class_jitter / math.sqrt(r))
    mean_coords = scale * (directions + jitter)
    class_means = mean_coords @ class_basis  # [C, D]

    prior = 1.0 / np.arange(1, c + 1, dtype=np.float64) ** config.class_skew
    prior /= prior.sum()

    # Unseen classes: an in-subspace part like a class mean, plus a part outside the class
    # subspace, so they are near the training data but not on it.
    unseen_in = rng.standard_normal((config.unseen_classes, r))
    unseen_in *= scale / np.linalg.norm(unseen_in, axis=1, keepdims=True)
    unseen_out = _random_unit_rows(rng, config.unseen_classes, outside_basis)
    unseen_means = unseen_in @ class_basis + config.unseen_offset * config.class_separation * unseen_out

    # Drift: each class mean moves along a random direction that is half inside the class
    # subspace (towards some other classes: more errors) and half off it (farther from the bank
    # and where the members disagree), reaching drift_strength separations.
    shift_in = rng.standard_normal((c, r)) @ class_basis
    shift_in /= np.linalg.norm(shift_in, axis=1, keepdims=True)
    shift_out = _random_unit_rows(rng, c, outside_basis)
    shift = (shift_in + shift_out) / math.sqrt(2.0)
    drift_shift = config.drift_strength * config.class_separation * shift

    # Heads: the Bayes rule of the in-distribution model. Class noise is isotropic with unit
    # variance inside the class subspace and the means lie in it, so the posterior's logits are
    # x . mu_c - |mu_c|^2 / 2 + log prior_c.
    shared_w = class_means.T  # [D, C]
    shared_b = -0.5 * np.sum(class_means**2, axis=1) + np.log(prior)
    head_norm = float(np.mean(np.linalg.norm(shared_w, axis=0)))
    heads = np.empty((d, m * c))
    biases = np.empty(m * c)
    # The large member perturbation lives off the data manifold only: in-distribution inputs have
    # no component there, so the members agree on them (see the module docstring for why).
    off_basis = basis[r + k :]
    for member in range(m):
        inside = class_basis.T @ rng.standard_normal((r, c)) / math.sqrt(r)
        if off_basis.shape[0]:
            outside = off_basis.T @ rng.standard_normal((off_basis.shape[0], c))
            outside /= math.sqrt(off_basis.shape[0])
        else:
            outside = np.zeros((d, c))
        w = shared_w + head_norm * (config.member_spread * inside + config.member_spread_outside * outside)
        heads[:, member * c : (member + 1) * c] = config.overconfidence * w
        biases[member * c : (member + 1) * c] = config.overconfidence * shared_b

    source_share = 1.0 / np.arange(1, config.sources + 1, dtype=np.float64) ** config.traffic_skew
    noise_basis = np.concatenate([class_basis, config.nuisance_std * nuisance_basis])

    def f32(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    return _World(
        class_means=f32(class_means),
        class_cdf=np.cumsum(prior),
        noise_basis=f32(noise_basis),
        unseen_means=f32(unseen_means),
        drift_shift=f32(drift_shift),
        heads=f32(heads),
        biases=f32(biases),
        noise_heads=f32(noise_basis @ heads),
        class_logits=f32(class_means @ heads + biases),
        unseen_logits=f32(unseen_means @ heads + biases),
        drift_logits=f32(drift_shift @ heads),
        source_cdf=np.cumsum(source_share / source_share.sum()),
    )


def _random_unit_rows(rng: np.random.Generator, n: int, basis: np.ndarray) -> np.ndarray:
    """``n`` random unit vectors in the span of ``basis``'s orthonormal rows ([n, D])."""
    if basis.shape[0] == 0:
        return np.zeros((n, basis.shape[1]))
    v = rng.standard_normal((n, basis.shape[0])) @ basis
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Row blocks


@dataclass
class _Rows:
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


def _generate_block(config: FleetConfig, stream: int, block: int, total: int) -> _Rows:
    """Rows [block * B, min((block + 1) * B, total)) of a file stream (B = GENERATION_BLOCK_ROWS).

    The draws happen in a fixed order with sizes that depend only on the block, so a block is the
    same whoever asks for it."""
    world = _world(config)
    rng = _block_rng(config, stream, block)
    start = block * GENERATION_BLOCK_ROWS
    stop = min(start + GENERATION_BLOCK_ROWS, total)
    n = stop - start
    index = np.arange(start, stop, dtype=np.int64)

    # Fraction of the day at which each row arrives (rows are evenly spread through the day).
    day = index.astype(np.float64) / total
    day_start = _parse_day_start(config.day_start)
    if stream == _STREAM_CALIBRATION:
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
    kind = np.full(n, _IN_DISTRIBUTION, dtype=np.int8)
    drift_amount = None
    if stream == _STREAM_FLEET:
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
        kind[is_ood & unseen] = _UNSEEN
        kind[is_ood & ~unseen] = _CORRUPTED
        if config.drift_strength > 0:
            drifting = (source == config.effective_drift_source) & (day > config.drift_start) & ~is_ood
            kind[drifting] = _DRIFT
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
    unseen_rows = np.flatnonzero(kind == _UNSEEN)
    unseen_pick = rng.integers(0, world.unseen_means.shape[0], size=n)
    centre = world.class_means[label]
    centre_logits = world.class_logits[label]
    if unseen_rows.size:
        centre[unseen_rows] = world.unseen_means[unseen_pick[unseen_rows]]
        centre_logits[unseen_rows] = world.unseen_logits[unseen_pick[unseen_rows]]
    embedding += centre
    logits += centre_logits
    drift_rows = np.flatnonzero(kind == _DRIFT)
    if drift_rows.size:
        amount = drift_amount[drift_rows, None]
        embedding[drift_rows] += amount * world.drift_shift[label[drift_rows]]
        logits[drift_rows] += amount * world.drift_logits[label[drift_rows]]
    corrupted_rows = np.flatnonzero(kind == _CORRUPTED)
    if corrupted_rows.size:
        low, high = config.corruption_scale
        factor = np.exp(rng.uniform(math.log(low), math.log(high), size=corrupted_rows.size)).astype(np.float32)
        noise = rng.standard_normal((corrupted_rows.size, config.dim), dtype=np.float32)
        noise *= np.float32(config.corruption_noise)
        embedding[corrupted_rows] = embedding[corrupted_rows] * factor[:, None] + noise
        logits[corrupted_rows] = embedding[corrupted_rows] @ world.heads + world.biases

    label[kind == _UNSEEN] = -1
    label[kind == _CORRUPTED] = -1
    is_error = _ensemble_errors(logits, label, config.members, config.classes)
    return _Rows(index, source, category, ts_ms, label, kind, embedding, logits, is_error)


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


# ------------------------------------------------------------------------------------------------
# Arrow conversion (zero-copy where the layout allows)


def _ids(prefixes: np.ndarray, code: np.ndarray, index: np.ndarray, digits: int) -> pa.Array:
    """Fixed-width string ids ``prefix[code] + zero-padded index``, built as one byte buffer.

    prefixes: [K, P] uint8 (all prefixes the same width). Formatting ten million ids in Python
    would take seconds; this is a few vectorised passes."""
    n = index.size
    width = prefixes.shape[1] + digits
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : prefixes.shape[1]] = prefixes[code]
    rest = index.copy()
    for pos in range(width - 1, prefixes.shape[1] - 1, -1):
        buf[:, pos] = 48 + rest % 10
        rest //= 10
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def _prefix_table(names: list[str]) -> np.ndarray:
    encoded = [s.encode() for s in names]
    if len({len(b) for b in encoded}) != 1:
        raise ValueError(f"id prefixes: expected equal widths, found {names[:4]}...")
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), -1)


def _fixed_list(values: np.ndarray, *sizes: int) -> pa.Array:
    """A (nested) fixed-size list array over a flat float32 buffer, without copying it."""
    arr = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _timestamps(ts_ms: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.timestamp("ms", tz="UTC"), ts_ms.size, [None, pa.py_buffer(ts_ms)])


class _Encoder:
    """Turns row blocks into record batches for one file stream (tables built once per stream)."""

    def __init__(self, config: FleetConfig, stream: int, total: int):
        self.config = config
        digits = max(9, len(str(max(total - 1, 0))))
        self.digits = digits
        names = config.source_names
        if stream == _STREAM_FLEET:
            self.prefixes = _prefix_table([f"{s}-" for s in names])
        elif stream == _STREAM_CALIBRATION:
            self.prefixes = _prefix_table(["cal-"])
        else:
            self.prefixes = _prefix_table(["bank-"])
        self.stream = stream
        self.fleet_schema = fleet_schema(config)
        self.calibration_schema = calibration_schema(config)
        self.bank_schema = bank_schema(config)
        self.source_names = pa.array(names, pa.string())
        self.category_names = pa.array(config.categories, pa.string())
        self.kind_names = pa.array(KINDS, pa.string())

    def ids(self, rows: _Rows) -> pa.Array:
        code = rows.source if self.stream == _STREAM_FLEET else np.zeros(rows.index.size, dtype=np.int32)
        return _ids(self.prefixes, code, rows.index, self.digits)

    def fleet(self, rows: _Rows, ids: pa.Array, with_label: bool) -> pa.RecordBatch:
        cfg = self.config
        columns = [
            ids,
            _fixed_list(rows.logits, cfg.members, cfg.classes),
            _fixed_list(rows.embedding, cfg.dim),
            self.source_names.take(pa.array(rows.source)),
            self.category_names.take(pa.array(rows.category)),
            _timestamps(rows.ts_ms),
        ]
        if with_label:
            columns.append(pa.array(rows.label))
            return pa.RecordBatch.from_arrays(columns, schema=self.calibration_schema)
        return pa.RecordBatch.from_arrays(columns, schema=self.fleet_schema)

    def truth(self, rows: _Rows, ids: pa.Array) -> pa.RecordBatch:
        columns = [
            ids,
            pa.array(rows.label),
            pa.array((rows.kind == _UNSEEN) | (rows.kind == _CORRUPTED)),
            pa.array(rows.is_error),
            self.kind_names.take(pa.array(rows.kind)),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=TRUTH_SCHEMA)

    def bank(self, rows: _Rows, ids: pa.Array) -> pa.RecordBatch:
        columns = [ids, _fixed_list(rows.embedding, self.config.dim), pa.array(rows.label)]
        return pa.RecordBatch.from_arrays(columns, schema=self.bank_schema)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own thread count
        logger.debug("threadpoolctl not installed: fleet generation runs BLAS with its default threads")
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas():
    """Run the block's two small GEMMs on one BLAS thread.

    Why: the other core is busy encoding and writing Parquet (or running the caller's code), and
    OpenBLAS's worker threads spin when they find no free core: on the shared 2-core machine a
    16k x 32 x 128 product took 5x longer with 2 threads than with 1. The limit is process-wide
    while it lasts (a block, milliseconds), never held across a ``yield``."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _block(config: FleetConfig, stream: int, block: int, total: int) -> _Rows:
    with _single_threaded_blas():
        return _generate_block(config, stream, block, total)


def _blocks(total: int) -> range:
    return range(-(-total // GENERATION_BLOCK_ROWS))


def _fleet_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    encoder = _Encoder(config, _STREAM_FLEET, config.rows)
    for block in _blocks(config.rows):
        rows = _block(config, _STREAM_FLEET, block, config.rows)
        ids = encoder.ids(rows)
        yield encoder.fleet(rows, ids, with_label=False), encoder.truth(rows, ids)


def _calibration_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch]]:
    encoder = _Encoder(config, _STREAM_CALIBRATION, config.calibration_rows)
    for block in _blocks(config.calibration_rows):
        rows = _block(config, _STREAM_CALIBRATION, block, config.calibration_rows)
        yield (encoder.fleet(rows, encoder.ids(rows), with_label=True),)


def _bank_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch]]:
    encoder = _Encoder(config, _STREAM_BANK, config.bank_rows)
    for block in _blocks(config.bank_rows):
        rows = _block(config, _STREAM_BANK, block, config.bank_rows)
        yield (encoder.bank(rows, encoder.ids(rows)),)


def _regroup(blocks: Iterator[tuple[pa.RecordBatch, ...]], group_rows: int) -> Iterator[list[list[pa.RecordBatch]]]:
    """Re-cut a stream of parallel batch tuples into groups of exactly ``group_rows`` rows (the last
    one shorter), as lists of zero-copy slices per parallel stream."""
    pending: list[tuple[pa.RecordBatch, ...]] = []
    held = 0
    for batches in blocks:
        offset = 0
        n = batches[0].num_rows
        while offset < n:
            take = min(group_rows - held, n - offset)
            pending.append(tuple(b.slice(offset, take) for b in batches))
            held += take
            offset += take
            if held == group_rows:
                yield [list(parts) for parts in zip(*pending)]
                pending, held = [], 0
    if pending:
        yield [list(parts) for parts in zip(*pending)]


def _one_batch(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    if hasattr(pa, "concat_batches"):  # pyarrow >= 19
        return pa.concat_batches(parts)
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


# ------------------------------------------------------------------------------------------------
# Public generators


def _check_batch_rows(batch_rows: int) -> None:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows: expected a positive int, found {batch_rows!r}")


def generate_fleet_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The fleet's predictions in memory, as record batches of ``batch_rows`` rows (the last one
    shorter) with :func:`fleet_schema`. The same rows as :func:`simulate_fleet` writes."""
    for fleet, _ in generate_fleet_with_truth(config, batch_rows):
        yield fleet


def generate_fleet_with_truth(
    config: FleetConfig, batch_rows: int = 65_536
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Pairs (fleet batch, truth batch) of ``batch_rows`` rows, row-aligned; the truth batch has
    :data:`TRUTH_SCHEMA`."""
    _check_batch_rows(batch_rows)
    for fleet, truth in _regroup(_fleet_block_batches(config), batch_rows):
        yield _one_batch(fleet), _one_batch(truth)


def generate_calibration_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Labelled in-distribution predictions (``calibration_rows`` of them, the day before the
    fleet's day) with :func:`calibration_schema`."""
    _check_batch_rows(batch_rows)
    for (parts,) in _regroup(_calibration_block_batches(config), batch_rows):
        yield _one_batch(parts)


def generate_bank_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """In-distribution reference embeddings (``bank_rows`` of them) with :func:`bank_schema`."""
    _check_batch_rows(batch_rows)
    for (parts,) in _regroup(_bank_block_batches(config), batch_rows):
        yield _one_batch(parts)


# ------------------------------------------------------------------------------------------------
# Writing


# Compression, by measurement on the 2-core machine (262k rows, M=5, C=10, D=128): the float
# columns are noise to any codec (lz4 saved 4% of the file, zstd 12%, at 15% and 35% lower write
# speed), so they are stored plain; the string and timestamp columns, a few percent of the bytes,
# are worth lz4 (ids share long prefixes) and source/category/kind are dictionary-encoded.
_COMPRESSED_COLUMNS = ("id", "source", "category", "ts", "label", "kind")
_DICTIONARY_COLUMNS = ["source", "category", "kind"]


def _writer(path: Path, schema: pa.Schema, config: FleetConfig, role: str) -> pq.ParquetWriter:
    metadata = {METADATA_KEY: json.dumps({"role": role, "config": json.loads(config.to_json())}).encode()}
    names = set(schema.names)
    return pq.ParquetWriter(
        path,
        schema.with_metadata(metadata),
        compression={name: "lz4" for name in _COMPRESSED_COLUMNS if name in names} or "none",
        use_dictionary=[name for name in _DICTIONARY_COLUMNS if name in names],
        # Statistics only where a reader can prune with them (time windows, id ranges, sources);
        # min/max over millions of random floats cost write time and prune nothing.
        write_statistics=[name for name in ("id", "source", "category", "ts", "label", "kind") if name in names],
    )


def simulate_fleet(
    out_path: str | Path,
    config: FleetConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FleetFiles:
    """Write a simulated fleet's four Parquet files and return where they went.

    ``out_path`` names the fleet file (FLEET.parquet); the calibration, bank and truth files go
    beside it (see :func:`fleet_paths`). Files are written row group by row group
    (``config.row_group_rows``), so memory stays at about two row groups whatever the size; the
    next group is generated while the previous one is written. ``progress(done, total)`` is
    called after every row group with rows done over all four files' generated rows
    (fleet + calibration + bank)."""
    config = config or FleetConfig()
    files = fleet_paths(out_path)
    files.fleet.parent.mkdir(parents=True, exist_ok=True)
    total = config.rows + config.calibration_rows + config.bank_rows
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    plan = [
        (
            _fleet_block_batches(config),
            [(files.fleet, fleet_schema(config), "fleet"), (files.truth, TRUTH_SCHEMA, "truth")],
        ),
        (_calibration_block_batches(config), [(files.calibration, calibration_schema(config), "calibration")]),
        (_bank_block_batches(config), [(files.bank, bank_schema(config), "bank")]),
    ]
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-writer") as pool:
        for blocks, targets in plan:
            writers = [_writer(path, schema, config, role) for path, schema, role in targets]
            pending = None  # (future of the group being written, its rows)
            try:
                # Generation (numpy releases the GIL in its loops) overlaps with Parquet encoding
                # and I/O on the writer thread (pyarrow releases it too); one group in flight, so
                # memory stays at about two row groups.
                for group in _regroup(blocks, config.row_group_rows):
                    rows = sum(batch.num_rows for batch in group[0])
                    if pending is not None:
                        pending[0].result()
                        advance(pending[1])
                    pending = (pool.submit(_write_group, writers, group, config.row_group_rows), rows)
                if pending is not None:
                    pending[0].result()
                    advance(pending[1])
                    pending = None
            finally:
                if pending is not None:
                    wait([pending[0]])  # never close a writer under the writing thread
                for writer in writers:
                    writer.close()
    logger.info("simulated fleet: %s", ", ".join(str(p) for p in files))
    return files


def _write_group(writers: list[pq.ParquetWriter], group: list[list[pa.RecordBatch]], group_rows: int) -> None:
    for writer, parts in zip(writers, group):
        writer.write_table(pa.Table.from_batches(parts), row_group_size=group_rows)


# ------------------------------------------------------------------------------------------------
# Validation helpers


def _check_int(config: FleetConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, found {value!r}")


def _check_float(config: FleetConfig, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name}: expected a finite number in {bounds}, found {value!r}")


@functools.lru_cache(maxsize=16)
def _parse_day_start(text: str) -> int:
    try:
        when = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"day_start: expected an ISO 8601 date-time, found {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return int(when.timestamp() * 1000)
