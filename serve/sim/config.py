"""The simulated fleet's configuration: :class:`FleetConfig` (every knob of the simulated world, with
its validation) and the constants that are part of the data's definition (generation block size,
row kinds, random streams, the length of a day)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
from dataclasses import dataclass

import numpy as np

#: Rows per generation block. Part of the data's definition: every block draws from its own
#: generator, so changing this changes the data (and nothing else does, apart from the config).
GENERATION_BLOCK_ROWS = 16_384

#: The truth file's ``kind`` values, in code order.
KINDS = ("in_distribution", "unseen_class", "corrupted", "drift")
#: The kinds' codes (int8 in the generated blocks).
IN_DISTRIBUTION, UNSEEN, CORRUPTED, DRIFT = range(4)

#: One simulated day, in milliseconds.
DAY_MS = 86_400_000

# Independent random streams: the latent world, then one per file. Part of the data's definition.
STREAM_WORLD, STREAM_FLEET, STREAM_CALIBRATION, STREAM_BANK = range(4)


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
        parse_day_start(self.day_start)

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
def parse_day_start(text: str) -> int:
    """``day_start`` as milliseconds since the epoch (a naive time is taken as UTC)."""
    try:
        when = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"day_start: expected an ISO 8601 date-time, found {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return int(when.timestamp() * 1000)
