"""Configuration of a triage profile: dataclasses with defaults that serve, loaded from TOML.

Every knob has a default; a ``triage.toml`` names only what it changes. Unknown keys are errors
that name the key and the section, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TIER_NAMES = ("general", "specialist", "adjudicator")
# Tables of triage.toml that the serving layer reads (the review queue, the service) or that a
# profile does not store (feedback's, read by `triage feedback`); the engine's configuration
# leaves them alone.
SERVE_TABLES = ("queue", "serve", "feedback")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclasses.dataclass
class CalibrationConfig:
    """Temperature scaling.

    ``holdout``: share of labelled calibration rows (chosen by a fixed hash of their id, so the
    split is reproducible) kept away from the temperature fit and used to choose thresholds, so the
    target-risk bound is computed on rows the temperature never saw.
    """

    per_source: bool = False
    min_rows_per_source: int = 1000
    holdout: float = 0.5

    def check(self) -> None:
        _in_range("calibration.holdout", self.holdout, 0.0, 0.95)
        _in_range("calibration.min_rows_per_source", self.min_rows_per_source, 1, None)


@dataclasses.dataclass
class ThresholdSelection:
    """How thresholds are chosen from calibration data (the ``[thresholds]`` section; the
    chosen values are a :class:`~hitl_triage.engine.policy.Thresholds` in the profile).

    mode "budget": escalate about ``budget`` of traffic, split across the confidence, disagreement
    and anomaly triggers by ``split``. mode "target_risk": the error rate among auto-accepted rows
    stays <= ``target_risk`` with probability >= 1 - ``delta``. In both modes the anomaly threshold
    lets ``ood_pass_rate`` of in-distribution rows pass (budget mode may lower it to meet its share),
    and ``vote_floor`` > 0 adds "vote agreement below the floor" to the disagreement trigger.
    In target-risk mode the disagreement threshold is the ``disagreement_quantile`` of calibration
    mutual information (1.0 disables it).
    """

    mode: str = "budget"
    budget: float = 0.10
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)
    target_risk: float = 0.05
    delta: float = 0.05
    ood_pass_rate: float = 0.95
    disagreement_quantile: float = 0.98
    vote_floor: float = 0.0

    def check(self) -> None:
        if self.mode not in ("budget", "target_risk"):
            raise ConfigError(f"thresholds.mode: expected 'budget' or 'target_risk', found {self.mode!r}")
        _in_range("thresholds.budget", self.budget, 0.0, 1.0)
        if len(self.split) != 3 or any(w < 0 for w in self.split) or sum(self.split) <= 0:
            raise ConfigError(
                f"thresholds.split: expected three non-negative weights (confidence, disagreement, "
                f"anomaly) with a positive sum, found {list(self.split)}"
            )
        _in_range("thresholds.target_risk", self.target_risk, 0.0, 1.0)
        _in_range("thresholds.delta", self.delta, 0.0, 1.0)
        _in_range("thresholds.ood_pass_rate", self.ood_pass_rate, 0.5, 1.0)
        _in_range("thresholds.disagreement_quantile", self.disagreement_quantile, 0.5, 1.0)
        _in_range("thresholds.vote_floor", self.vote_floor, 0.0, 1.0)


@dataclasses.dataclass
class BankConfig:
    """The k-NN reference bank: ``k`` for the k-th-neighbour distance, the FAISS index kind
    ("auto" picks exact flat search for small banks and IVF above the kernels' threshold), and
    for IVF the largest mean relative error of the k-th distance that ``nprobe`` is tuned to at
    fit time (measured against exact search on calibration embeddings). 0.005 keeps the k-NN
    AUROC within 0.005 of exact search on the fleet simulator (bench knn: 0.01 lost 0.005-0.008)."""

    k: int = 10
    index: str = "auto"
    max_knn_error: float = 0.005

    def check(self) -> None:
        _in_range("bank.k", self.k, 1, 1024)
        _in_range("bank.max_knn_error", self.max_knn_error, 0.0, 0.5)
        if self.index not in ("auto", "flat", "ivf"):
            raise ConfigError(f"bank.index: expected 'auto', 'flat' or 'ivf', found {self.index!r}")


@dataclasses.dataclass
class PolicyConfig:
    """Rules that hold whatever the model says.

    ``mandatory_categories``: a row whose ``category`` is listed is always escalated (POLICY bit).
    ``category_min_confidence``: per-category confidence floor (a high-stakes category demands
    0.95 where the global threshold accepts 0.70); the row's confidence threshold is the higher
    of the global one and its category's. ``category_tier``: the tier a category's escalations
    go to at least. ``category_priority``: the priority of a POLICY escalation (default 0.5).
    ``on_missing_embedding``: "error" refuses a batch whose rows lack the embedding the profile's
    bank needs; "escalate" accepts it and escalates those rows with the ANOMALY bit.
    """

    mandatory_categories: list[str] = dataclasses.field(default_factory=list)
    category_min_confidence: dict[str, float] = dataclasses.field(default_factory=dict)
    category_tier: dict[str, str] = dataclasses.field(default_factory=dict)
    category_priority: dict[str, float] = dataclasses.field(default_factory=dict)
    on_missing_embedding: str = "error"

    def check(self) -> None:
        for name, value in self.category_min_confidence.items():
            _in_range(f"policy.category_min_confidence.{name}", value, 0.0, 1.0)
        for name, value in self.category_priority.items():
            _in_range(f"policy.category_priority.{name}", value, 0.0, 1.0)
        if self.on_missing_embedding not in ("error", "escalate"):
            raise ConfigError(
                f"policy.on_missing_embedding: expected 'error' or 'escalate', found {self.on_missing_embedding!r}"
            )


@dataclasses.dataclass
class TierConfig:
    """Which reviewer tier each reason goes to; a row with several reasons goes to the highest
    tier among them, in the order of ``order`` (lowest first)."""

    order: list[str] = dataclasses.field(default_factory=lambda: list(TIER_NAMES))
    confidence: str = "general"
    disagreement: str = "specialist"
    policy: str = "specialist"
    anomaly: str = "specialist"
    audit: str = "general"
    invalid: str = "specialist"
    reported: str = "specialist"

    def check(self, category_tier: dict[str, str]) -> None:
        if len(set(self.order)) != len(self.order) or not self.order:
            raise ConfigError(f"tiers.order: expected distinct tier names, found {self.order}")
        for field in ("confidence", "disagreement", "policy", "anomaly", "audit", "invalid", "reported"):
            value = getattr(self, field)
            if value not in self.order:
                raise ConfigError(f"tiers.{field}: expected one of {self.order}, found {value!r}")
        for name, value in category_tier.items():
            if value not in self.order:
                raise ConfigError(f"policy.category_tier.{name}: expected one of {self.order}, found {value!r}")


@dataclasses.dataclass
class AuditOverride:
    """A per-stratum audit rate: ``match`` maps stratum columns to values (all must match)."""

    match: dict[str, str | int]
    rate: float


@dataclasses.dataclass
class AuditConfig:
    """Stratified Bernoulli audit sampling.

    A row is sampled when ``audit_uniform(id, seed) < rate`` of its stratum. Strata come from
    ``strata`` (any of "source", "category", "predicted_class", "confidence_bin"); the rate is
    ``base_rate`` unless an override matches (the most specific match wins: the one naming most
    columns, later ones winning ties). ``confidence_bins`` are the bin edges of "confidence_bin".
    """

    seed: int = 0
    base_rate: float = 0.01
    strata: list[str] = dataclasses.field(default_factory=lambda: ["source", "predicted_class"])
    confidence_bins: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.8, 0.95])
    overrides: list[AuditOverride] = dataclasses.field(default_factory=list)

    STRATUM_COLUMNS = ("source", "category", "predicted_class", "confidence_bin")

    def check(self) -> None:
        _in_range("audit.seed", self.seed, 0, 2**64 - 1)
        _in_range("audit.base_rate", self.base_rate, 0.0, 1.0)
        for column in self.strata:
            if column not in self.STRATUM_COLUMNS:
                raise ConfigError(f"audit.strata: expected columns among {list(self.STRATUM_COLUMNS)}, found {column!r}")
        if sorted(self.confidence_bins) != list(self.confidence_bins):
            raise ConfigError(f"audit.confidence_bins: expected increasing edges, found {self.confidence_bins}")
        for i, override in enumerate(self.overrides):
            _in_range(f"audit.overrides[{i}].rate", override.rate, 0.0, 1.0)
            for column in override.match:
                if column not in self.strata:
                    raise ConfigError(
                        f"audit.overrides[{i}].match: expected columns among audit.strata {self.strata}, found {column!r}"
                    )


@dataclasses.dataclass
class FeedbackConfig:
    """How a feedback round makes the next profile version (the ``[feedback]`` table; README,
    "Feedback").

    ``old_share``: the weight of every row older than this round's audit verdicts together
    (calibration rows, earlier rounds), the new audit rows carrying the rest; ``min_share``: a row
    weighing less than this share of an average row is dropped; ``min_audit_verdicts``: fewer new
    audit verdicts than this keep the temperature and thresholds (the bank and the watch list still
    grow). ``split_min`` / ``split_max``: bounds of each trigger's share (confidence,
    disagreement, anomaly) in the split search of budget mode, on a grid of ``split_step``; the
    default floor of 0.1 keeps every trigger escalating, so later rounds still see verdicts on
    what it catches (a trigger at 0 would only be judged by the audit sample);
    ``split_min_gain_se``: a split replaces the configured one only when it catches more
    problems per reviewed item by more than this many standard errors.
    ``watch_clear_share``: share of in-scope rows that must stay outside the watch radius;
    ``watch_max_radius``: the radius never exceeds this (distance between unit vectors, in [0, 2];
    default: the profile's anomaly threshold, the distance at which the bank itself calls a row
    unusual, or 0.5 without one).
    """

    old_share: float = 0.25
    min_share: float = 0.01
    min_audit_verdicts: int = 200
    split_min: tuple[float, float, float] = (0.1, 0.1, 0.1)
    split_max: tuple[float, float, float] = (0.8, 0.8, 0.8)
    split_step: float = 0.1
    split_min_gain_se: float = 2.0
    watch_clear_share: float = 0.999
    watch_max_radius: float | None = None

    def check(self) -> "FeedbackConfig":
        _in_range("feedback.old_share", self.old_share, 0.0, 0.95)
        _in_range("feedback.min_share", self.min_share, 0.0, 1.0)
        _in_range("feedback.min_audit_verdicts", self.min_audit_verdicts, 1, None)
        _in_range("feedback.split_step", self.split_step, 0.01, 1.0)
        _in_range("feedback.split_min_gain_se", self.split_min_gain_se, 0.0, None)
        for name in ("split_min", "split_max"):
            for i, value in enumerate(getattr(self, name)):
                _in_range(f"feedback.{name}[{i}]", value, 0.0, 1.0)
        if any(lo > hi for lo, hi in zip(self.split_min, self.split_max)) or sum(self.split_min) > 1 + 1e-9 \
                or sum(self.split_max) < 1 - 1e-9:
            raise ConfigError(f"feedback.split_min / split_max: expected bounds lo <= hi with sum(lo) <= 1 <= sum(hi), "
                              f"found {list(self.split_min)} and {list(self.split_max)}")
        _in_range("feedback.watch_clear_share", self.watch_clear_share, 0.5, 1.0)
        if self.watch_max_radius is not None:
            _in_range("feedback.watch_max_radius", self.watch_max_radius, 0.0, 2.0)
        return self

    @classmethod
    def from_toml(cls, path: str | Path | None) -> "FeedbackConfig":
        """The ``[feedback]`` table of a ``triage.toml`` (defaults without a file or a table)."""
        if path is None:
            return cls().check()
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: expected a readable TOML file, found {exc}") from None
        return from_dict(cls, data.get("feedback", {}), "feedback").check()


@dataclasses.dataclass
class TriageConfig:
    """Everything ``triage fit`` needs besides the data (the ``triage.toml`` file)."""

    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    thresholds: ThresholdSelection = dataclasses.field(default_factory=ThresholdSelection)
    bank: BankConfig = dataclasses.field(default_factory=BankConfig)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    tiers: TierConfig = dataclasses.field(default_factory=TierConfig)
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)
    class_names: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> "TriageConfig":
        self.calibration.check()
        self.thresholds.check()
        self.bank.check()
        self.policy.check()
        self.tiers.check(self.policy.category_tier)
        self.audit.check()
        return self

    def check_fit(self) -> "TriageConfig":
        """:meth:`check`, plus the combinations a fit refuses (a profile that holds them still
        loads): target-risk mode needs held-out rows, because its bound is only valid on rows the
        temperature was not fitted on."""
        self.check()
        if self.thresholds.mode == "target_risk" and self.calibration.holdout <= 0:
            raise ConfigError(
                f"calibration.holdout: expected a share > 0 in target-risk mode (the risk bound holds "
                f"only on rows the temperature fit never saw), found {self.calibration.holdout!r}; "
                "keep a holdout or use budget mode"
            )
        return self

    @classmethod
    def from_toml(cls, path: str | Path) -> "TriageConfig":
        """Read a ``triage.toml``; every error names the file."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: expected valid TOML, found a syntax error: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: expected UTF-8 TOML, found bytes that are not UTF-8 "
                              f"({exc.reason} at byte {exc.start})") from None
        except FileNotFoundError:
            raise ConfigError(f"{path}: expected a TOML file, found no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: expected a TOML file, found a directory") from None
        except OSError as exc:
            raise ConfigError(f"{path}: expected a readable TOML file, found {exc.strerror or exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None

    @classmethod
    def from_dict(cls, data: dict) -> "TriageConfig":
        # The serving layer's tables (read by hitl_triage.serve) may share the file.
        engine_tables = {k: v for k, v in data.items() if k not in SERVE_TABLES} if isinstance(data, dict) else data
        return from_dict(cls, engine_tables, "").check()

    def to_dict(self) -> dict:
        return to_dict(self)


def from_dict(cls, data, where: str):
    """Build dataclass ``cls`` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key {unknown[0]!r}; expected one of {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}".lstrip(".")) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, found {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, found {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {hint}, found {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, found {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return value
    return value


def to_dict(obj):
    """Dataclasses to TOML-friendly nested dicts and lists (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _in_range(name: str, value, low, high) -> None:
    if (isinstance(value, float) and math.isnan(value)) or (low is not None and value < low) or (
            high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: expected a value in {bounds}, found {value!r}")
