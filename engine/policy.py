"""Escalation rules: the reason bits, the reviewer tier and the priority of each row.

All rules are elementwise tensor operations on the engine's device; categories arrive as integer
codes into the policy's lookup tables (see :func:`category_codes`), so no per-row Python runs.

Priority (float32 in [0, 1], higher is more urgent; 0 for rows that are not escalated): the
largest severity among the row's fired reasons, where

- CONFIDENCE: (t - confidence) / t, how far below its threshold t the confidence fell;
- DISAGREEMENT: (mi - t_mi) / (log min(M, C) - t_mi), the share of the way from the threshold to
  the largest possible mutual information (1 when only the vote floor fired);
- ANOMALY: min(1, (d - t_ood) / t_ood), the k-NN distance's excess over its threshold;
- POLICY: the category's configured priority (default 0.5);
- AUDIT: 0 (an audit sample is not urgent);
- REPORTED: 0.9 (a user challenged the prediction; only rows that cannot be scored come first);
- KNOWN_EDGE_CASE: 0.95 (the embedding lies within the watch list's radius of a case reviewers
  marked out of scope or wrong: the fleet already paid for a review of its kind once);
- rows that cannot be scored (non-finite or missing logits, missing embedding): 1.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import cast

import torch

from .config import PolicyConfig, TierConfig
from .lookup import lookup_codes

DEFAULT_POLICY_PRIORITY = 0.5
REPORTED_PRIORITY = 0.9
KNOWN_EDGE_CASE_PRIORITY = 0.95


class Reason(enum.IntFlag):
    """Bits of ``reason_mask`` (DESIGN.md, "Escalation triggers")."""

    CONFIDENCE = 1
    DISAGREEMENT = 2
    POLICY = 4
    ANOMALY = 8
    AUDIT = 16
    REPORTED = 32  # a prediction users challenged (the service's Report call), whatever the model said
    KNOWN_EDGE_CASE = 64  # near a case on the profile's watch list (engine/watchlist.py), on every source


def reason_names(mask: int) -> list[str]:
    """The names of the bits set in ``mask``, lowest bit first."""
    return [cast(str, reason.name).lower() for reason in Reason if mask & reason]


@dataclasses.dataclass
class Thresholds:
    """The fitted thresholds the rules apply (stored in the profile).

    ``confidence``: escalate when calibrated confidence < this (per predicted class where
    ``per_class_confidence`` is given, and never below the row's category floor);
    ``mutual_info``: escalate when mutual information > this (inf disables);
    ``vote_floor``: escalate when vote agreement < this (0 disables);
    ``ood``: escalate when the k-NN distance > this (inf disables, e.g. without a bank);
    ``watch_radius``: escalate when the distance to the nearest watched case is <= this (None:
    no watch list; written by feedback, :mod:`hitl_triage.engine.watchlist`).
    """

    confidence: float
    mutual_info: float = math.inf
    vote_floor: float = 0.0
    ood: float = math.inf
    per_class_confidence: list[float] | None = None
    watch_radius: float | None = None


@dataclasses.dataclass
class CategoryTables:
    """Per-category lookups indexed by category code; code 0 is "no or unlisted category"."""

    names: list[str]
    mandatory: torch.Tensor      # bool [K]
    min_confidence: torch.Tensor  # float32 [K]
    tier_rank: torch.Tensor      # int8 [K], -1 = no category tier
    priority: torch.Tensor       # float32 [K]

    @classmethod
    def build(cls, policy: PolicyConfig, tiers: TierConfig, device) -> "CategoryTables":
        names = [""] + sorted(
            set(policy.mandatory_categories)
            | set(policy.category_min_confidence)
            | set(policy.category_tier)
            | set(policy.category_priority)
        )
        rank = {name: i for i, name in enumerate(tiers.order)}
        return cls(
            names=names,
            mandatory=torch.tensor([n in policy.mandatory_categories for n in names], device=device),
            min_confidence=torch.tensor(
                [policy.category_min_confidence.get(n, 0.0) for n in names], dtype=torch.float32, device=device
            ),
            tier_rank=torch.tensor(
                [rank[policy.category_tier[n]] if n in policy.category_tier else -1 for n in names],
                dtype=torch.int8, device=device,
            ),
            priority=torch.tensor(
                [policy.category_priority.get(n, DEFAULT_POLICY_PRIORITY) for n in names],
                dtype=torch.float32, device=device,
            ),
        )


def category_codes(category, tables: CategoryTables, device) -> torch.Tensor | None:
    """Codes of a string column into ``tables`` (0 for null or unlisted); None without a column
    or without any category rule."""
    if category is None or len(tables.names) == 1:
        return None
    mapping = {name: code for code, name in enumerate(tables.names) if code}
    return torch.from_numpy(lookup_codes(category, mapping)).to(device)


@dataclasses.dataclass
class RuleInputs:
    """Per-row inputs of the rules, all tensors of length B on one device (built by
    :func:`hitl_triage.engine.scoring.rule_inputs`, at fit time and at run time alike)."""

    confidence: torch.Tensor
    mutual_info: torch.Tensor
    vote_agreement: torch.Tensor
    predicted_class: torch.Tensor
    valid: torch.Tensor              # bool: the row could be scored (finite logits, none missing)
    ood_score: torch.Tensor | None   # NaN where the embedding was missing or zero; None without a bank
    category_code: torch.Tensor | None
    audit_sampled: torch.Tensor      # bool
    members: int
    classes: int
    reported: torch.Tensor | None = None  # bool: rows users reported; None: none
    watch_distance: torch.Tensor | None = None  # float32: to the nearest watched case; None: no watch list

    def take(self, rows: torch.Tensor) -> "RuleInputs":
        """The inputs of the given rows (int64 indices or a bool mask)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return dataclasses.replace(
            self, confidence=self.confidence[rows], mutual_info=self.mutual_info[rows],
            vote_agreement=self.vote_agreement[rows], predicted_class=self.predicted_class[rows],
            valid=self.valid[rows], ood_score=pick(self.ood_score), category_code=pick(self.category_code),
            audit_sampled=self.audit_sampled[rows], reported=pick(self.reported),
            watch_distance=pick(self.watch_distance),
        )


@dataclasses.dataclass
class Triggers:
    """Which reason bits fire on each row (bool [B] each), and the confidence threshold each row
    was held to (float32 [B]: global or per class, raised to the row's category floor)."""

    confidence: torch.Tensor
    disagreement: torch.Tensor
    policy: torch.Tensor
    anomaly: torch.Tensor
    audit: torch.Tensor
    reported: torch.Tensor
    confidence_threshold: torch.Tensor
    high_mi: torch.Tensor
    low_vote: torch.Tensor
    missing_embedding: torch.Tensor
    known_edge_case: torch.Tensor

    def model(self) -> torch.Tensor:
        """bool [B]: a trigger the review budget pays for fired (confidence, disagreement, anomaly,
        or a known edge case: a watch-list hit is an escalation of the embedding, like an anomaly,
        so budget mode counts it and lowers the other thresholds to make room)."""
        return self.confidence | self.disagreement | self.anomaly | self.known_edge_case

    def reason_mask(self) -> torch.Tensor:
        """uint8 [B] ``reason_mask`` (bits of :class:`Reason`)."""
        return (
            self.confidence.to(torch.uint8) * int(Reason.CONFIDENCE)
            | self.disagreement.to(torch.uint8) * int(Reason.DISAGREEMENT)
            | self.policy.to(torch.uint8) * int(Reason.POLICY)
            | self.anomaly.to(torch.uint8) * int(Reason.ANOMALY)
            | self.audit.to(torch.uint8) * int(Reason.AUDIT)
            | self.reported.to(torch.uint8) * int(Reason.REPORTED)
            | self.known_edge_case.to(torch.uint8) * int(Reason.KNOWN_EDGE_CASE)
        )


@dataclasses.dataclass
class RuleOutputs:
    reason_mask: torch.Tensor  # uint8
    tier_rank: torch.Tensor    # int8, -1 where not escalated
    priority: torch.Tensor     # float32


def fire_triggers(x: RuleInputs, thresholds: Thresholds, tables: CategoryTables) -> Triggers:
    """The escalation rule: which reason bits fire for these inputs, thresholds and categories.

    This is the only statement of the rule; choosing thresholds, the expected rates a fit
    reports and the decisions of a run all call it. Thresholds are compared in the signals'
    float32 (torch casts a Python scalar to the tensor's dtype), so a row on a threshold falls on
    the same side everywhere. A row that cannot be scored fires every model trigger that could
    fire (NaN never means "auto-accept"); a missing embedding fires ANOMALY, even where the
    anomaly threshold is off, because the bank could not vouch for the row.
    """
    device = x.confidence.device
    invalid = ~x.valid
    nothing = torch.zeros(x.confidence.shape, dtype=torch.bool, device=device)

    # CONFIDENCE: below the row's threshold, or not valid.
    conf_threshold = torch.full(x.confidence.shape, thresholds.confidence, dtype=torch.float32, device=device)
    if thresholds.per_class_confidence is not None:
        table = torch.tensor(thresholds.per_class_confidence, dtype=torch.float32, device=device)
        conf_threshold = table[x.predicted_class.long().clamp(min=0)]
    if x.category_code is not None:
        conf_threshold = torch.maximum(conf_threshold, tables.min_confidence[x.category_code])
    low_confidence = (x.confidence < conf_threshold) | invalid

    # DISAGREEMENT: only an ensemble can disagree.
    if x.members > 1:
        high_mi = x.mutual_info > thresholds.mutual_info
        low_vote = x.vote_agreement < thresholds.vote_floor
        disagreement = high_mi | low_vote | invalid
    else:
        high_mi = low_vote = disagreement = nothing

    policy = tables.mandatory[x.category_code] if x.category_code is not None else nothing

    if x.ood_score is not None:
        missing_embedding = torch.isnan(x.ood_score)
        anomaly = (x.ood_score > thresholds.ood) | missing_embedding
    else:
        missing_embedding = anomaly = nothing

    # KNOWN_EDGE_CASE: within the watch radius of a watched case (a NaN distance, from a missing
    # embedding, is not "near": that row fires ANOMALY above).
    known = nothing
    if x.watch_distance is not None and thresholds.watch_radius is not None:
        known = x.watch_distance <= thresholds.watch_radius
    return Triggers(
        confidence=low_confidence, disagreement=disagreement, policy=policy, anomaly=anomaly,
        audit=x.audit_sampled, reported=x.reported if x.reported is not None else nothing,
        confidence_threshold=conf_threshold, high_mi=high_mi, low_vote=low_vote,
        missing_embedding=missing_embedding, known_edge_case=known,
    )


def apply_rules(x: RuleInputs, thresholds: Thresholds, tiers: TierConfig, tables: CategoryTables) -> RuleOutputs:
    """Fire the reason bits (:func:`fire_triggers`), then set the tier and the priority of every row."""
    device = x.confidence.device
    rank = {name: i for i, name in enumerate(tiers.order)}
    fired = fire_triggers(x, thresholds, tables)
    invalid = ~x.valid
    mask = fired.reason_mask()

    # Tier: the highest-ranked tier among the fired reasons and the row's category.
    tier = torch.full(mask.shape, -1, dtype=torch.int8, device=device)
    for rows, tier_name in (
        (fired.audit, tiers.audit),
        (fired.confidence, tiers.confidence),
        (fired.disagreement, tiers.disagreement),
        (fired.anomaly, tiers.anomaly),
        (fired.known_edge_case, tiers.anomaly),  # the embedding's reviewers, as for an anomaly
        (fired.policy, tiers.policy),
        (fired.reported, tiers.reported),
        (invalid | fired.missing_embedding, tiers.invalid),
    ):
        tier = torch.where(rows, torch.clamp(tier, min=rank[tier_name]), tier)
    if x.category_code is not None:
        category_rank = tables.tier_rank[x.category_code]
        tier = torch.where(mask > 0, torch.maximum(tier, category_rank), tier)

    # Priority: the largest severity among fired reasons (module docstring).
    severity = torch.zeros(x.confidence.shape, dtype=torch.float32, device=device)
    # Per row: the threshold may come from a category floor even where the global one is 0.
    conf_threshold = fired.confidence_threshold
    conf_sev = ((conf_threshold - x.confidence) / conf_threshold.clamp(min=1e-6)).clamp(0, 1)
    severity = torch.where(fired.confidence, torch.maximum(severity, conf_sev.nan_to_num(0.0)), severity)
    if x.members > 1:
        mi_max = math.log(min(x.members, x.classes))
        span = max(mi_max - thresholds.mutual_info, 1e-6) if math.isfinite(thresholds.mutual_info) else 1.0
        mi_sev = ((x.mutual_info - thresholds.mutual_info) / span).clamp(0, 1).nan_to_num(0.0)
        mi_sev = torch.where(fired.low_vote & ~fired.high_mi, torch.ones_like(mi_sev), mi_sev)
        severity = torch.where(fired.disagreement, torch.maximum(severity, mi_sev), severity)
    if x.ood_score is not None and math.isfinite(thresholds.ood):
        ood_sev = ((x.ood_score - thresholds.ood) / max(thresholds.ood, 1e-6)).clamp(0, 1).nan_to_num(0.0)
        severity = torch.where(fired.anomaly, torch.maximum(severity, ood_sev), severity)
    if x.category_code is not None:
        severity = torch.where(fired.policy, torch.maximum(severity, tables.priority[x.category_code]), severity)
    if x.reported is not None:
        severity = torch.where(fired.reported, severity.clamp(min=REPORTED_PRIORITY), severity)
    severity = torch.where(fired.known_edge_case, severity.clamp(min=KNOWN_EDGE_CASE_PRIORITY), severity)
    severity = torch.where(invalid | fired.missing_embedding, torch.ones_like(severity), severity)
    return RuleOutputs(reason_mask=mask, tier_rank=tier, priority=severity.to(torch.float32))
