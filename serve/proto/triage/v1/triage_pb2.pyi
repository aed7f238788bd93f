from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TriageRequest(_message.Message):
    __slots__ = ("arrow_ipc",)
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    def __init__(self, arrow_ipc: _Optional[bytes] = ...) -> None: ...

class TriageResponse(_message.Message):
    __slots__ = ("arrow_ipc", "profile_version", "rows", "escalated")
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    profile_version: str
    rows: int
    escalated: int
    def __init__(self, arrow_ipc: _Optional[bytes] = ..., profile_version: _Optional[str] = ..., rows: _Optional[int] = ..., escalated: _Optional[int] = ...) -> None: ...

class VerdictsRequest(_message.Message):
    __slots__ = ("arrow_ipc",)
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    arrow_ipc: bytes
    def __init__(self, arrow_ipc: _Optional[bytes] = ...) -> None: ...

class VerdictsResponse(_message.Message):
    __slots__ = ("stored", "duplicates", "done", "moved")
    STORED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    duplicates: int
    done: int
    moved: int
    def __init__(self, stored: _Optional[int] = ..., duplicates: _Optional[int] = ..., done: _Optional[int] = ..., moved: _Optional[int] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProfileInfo(_message.Message):
    __slots__ = ("version", "members", "classes", "dim", "class_names", "tiers", "temperature", "thresholds", "fit_report_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    FIT_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    members: int
    classes: int
    dim: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    thresholds: Thresholds
    fit_report_json: str
    def __init__(self, version: _Optional[str] = ..., members: _Optional[int] = ..., classes: _Optional[int] = ..., dim: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., tiers: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., fit_report_json: _Optional[str] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("confidence", "mutual_info", "vote_floor", "ood")
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_INFO_FIELD_NUMBER: _ClassVar[int]
    VOTE_FLOOR_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    confidence: float
    mutual_info: float
    vote_floor: float
    ood: float
    def __init__(self, confidence: _Optional[float] = ..., mutual_info: _Optional[float] = ..., vote_floor: _Optional[float] = ..., ood: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "depth", "in_flight", "oldest_age_s", "done", "dead")
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_S_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    tier: str
    depth: int
    in_flight: int
    oldest_age_s: float
    done: int
    dead: int
    def __init__(self, tier: _Optional[str] = ..., depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., oldest_age_s: _Optional[float] = ..., done: _Optional[int] = ..., dead: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("profile_version", "rows", "escalated", "by_reason", "queue", "verdicts", "admitted_rows", "budget", "monitoring_json")
    class ByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class VerdictsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    BY_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MONITORING_JSON_FIELD_NUMBER: _ClassVar[int]
    profile_version: str
    rows: int
    escalated: int
    by_reason: _containers.ScalarMap[str, int]
    queue: _containers.RepeatedCompositeFieldContainer[TierStats]
    verdicts: _containers.ScalarMap[str, int]
    admitted_rows: int
    budget: BudgetControl
    monitoring_json: str
    def __init__(self, profile_version: _Optional[str] = ..., rows: _Optional[int] = ..., escalated: _Optional[int] = ..., by_reason: _Optional[_Mapping[str, int]] = ..., queue: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., verdicts: _Optional[_Mapping[str, int]] = ..., admitted_rows: _Optional[int] = ..., budget: _Optional[_Union[BudgetControl, _Mapping]] = ..., monitoring_json: _Optional[str] = ...) -> None: ...

class BudgetControl(_message.Message):
    __slots__ = ("enabled", "step", "budget", "thresholds", "rows_seen", "window_rows", "window_rate", "profile_version")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SEEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ROWS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_RATE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    step: int
    budget: float
    thresholds: Thresholds
    rows_seen: int
    window_rows: int
    window_rate: float
    profile_version: str
    def __init__(self, enabled: _Optional[bool] = ..., step: _Optional[int] = ..., budget: _Optional[float] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., rows_seen: _Optional[int] = ..., window_rows: _Optional[int] = ..., window_rate: _Optional[float] = ..., profile_version: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("previous_version", "version")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    version: str
    def __init__(self, previous_version: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
