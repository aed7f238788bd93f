"""The service's settings: the ``[serve]`` table of triage.toml, with command-line flags over it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from hitl_triage.engine.config import ConfigError, from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROLES = ("fleet", "reviewer", "admin")


@dataclasses.dataclass
class BudgetControlOptions:
    """``[serve.budget_control]``: online budget control (engine/budget_control.py), off by default
    (the profile's thresholds are the ones its fit chose and reported). ``enabled`` needs a
    budget-mode profile; the window holds every ``sample_every``-th decided row, the last
    ``window_rows`` of them; a step re-chooses the thresholds once ``step_rows`` rows have been
    decided since the last one (between two batches)."""

    enabled: bool = False
    window_rows: int = 16_384
    sample_every: int = 4
    step_rows: int = 65_536

    def check(self) -> None:
        for name, low in (("window_rows", 16), ("sample_every", 1), ("step_rows", 1)):
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"serve.budget_control.{name}: expected at least {low}, found {value}")


@dataclasses.dataclass
class TokenGrant:
    """A token's entry in its long form, ``{role = "reviewer", reviewer = "ana", tiers = ["expert"]}``:
    besides the role, the one reviewer whose verdicts the token may submit and the tiers it may
    give them at (empty: any). ``token = "role"`` is the short form: a role, nothing bound."""

    role: str = ""
    reviewer: str = ""
    tiers: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServeConfig:
    """``host``: the address every port binds; ``port``: gRPC (triage.v1, the Open Inference
    Protocol, health, reflection; 0 = any free port); ``flight_port``: Arrow Flight (0 = any free
    port, -1 = off); ``metrics_port``: Prometheus text on HTTP (-1 = off).
    ``max_batch_rows`` / ``max_delay_ms``: the dynamic batcher sends a batch to the engine when it
    holds this many rows or when its first request has waited this long; ``max_queue_rows``: rows
    admitted and not yet answered, beyond which a call is refused at once (RESOURCE_EXHAUSTED);
    ``max_message_mb``: largest gRPC message either way. ``workers``: server processes on the same
    ports (SO_REUSEPORT). ``tokens``: token -> role (fleet: triage and report; reviewer: verdicts;
    admin: everything, reload included), or token -> :class:`TokenGrant` (a role bound to a
    reviewer and tiers); empty = no authentication. ``tls_cert`` / ``tls_key``: PEM files; both or
    neither. ``tls_client_ca``: a PEM file of the CA that signs client certificates: set, every
    connection must present one it signed (mutual TLS, both ports). ``reflection``: serve gRPC
    server reflection. (Rows users report go to the profile's ``tiers.reported``.)
    ``budget_control``: :class:`BudgetControlOptions`.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    flight_port: int = 50052
    metrics_port: int = 9464
    max_batch_rows: int = 65_536
    max_delay_ms: float = 2.0
    max_queue_rows: int = 1_048_576
    max_message_mb: int = 256
    workers: int = 1
    tokens: dict[str, str | TokenGrant] = dataclasses.field(default_factory=dict)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    reflection: bool = True
    feedback_every_s: float = 0.0  # > 0: run `triage feedback` on the queue this often and reload (0: off)
    budget_control: BudgetControlOptions = dataclasses.field(default_factory=BudgetControlOptions)

    def check(self) -> "ServeConfig":
        self.budget_control.check()
        for name in ("port", "flight_port", "metrics_port"):
            value = getattr(self, name)
            if not (-1 <= value <= 65535):
                raise ConfigError(f"serve.{name}: expected a port in [0, 65535] (or -1: off), found {value}")
        if self.port < 0:
            raise ConfigError(f"serve.port: expected a port in [0, 65535] (gRPC cannot be off), found {self.port}")
        if self.max_batch_rows < 1:
            raise ConfigError(f"serve.max_batch_rows: expected at least 1, found {self.max_batch_rows}")
        if not (0 <= self.max_delay_ms <= 10_000):
            raise ConfigError(f"serve.max_delay_ms: expected a value in [0, 10000], found {self.max_delay_ms}")
        if self.max_queue_rows < self.max_batch_rows:
            raise ConfigError(f"serve.max_queue_rows: expected at least max_batch_rows ({self.max_batch_rows}), "
                              f"found {self.max_queue_rows}")
        if not (1 <= self.max_message_mb <= 2047):
            raise ConfigError(f"serve.max_message_mb: expected a value in [1, 2047], found {self.max_message_mb}")
        if not (1 <= self.workers <= 256):
            raise ConfigError(f"serve.workers: expected a value in [1, 256], found {self.workers}")
        for token, entry in self.tokens.items():
            role = entry.role if isinstance(entry, TokenGrant) else entry
            if role not in ROLES:
                raise ConfigError(f"serve.tokens: expected roles among {list(ROLES)}, found {role!r}")
            if not token:
                raise ConfigError("serve.tokens: expected non-empty tokens, found an empty one")
        if not (0 <= self.feedback_every_s < float("inf")):
            raise ConfigError(f"serve.feedback_every_s: expected seconds >= 0 (0: off), found {self.feedback_every_s}")
        if self.feedback_every_s > 0 and self.workers > 1:
            raise ConfigError(f"serve.feedback_every_s: expected workers = 1 with scheduled feedback (each worker would "
                              f"make its own version), found workers = {self.workers}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("serve.tls_cert / serve.tls_key: expected both PEM files or neither, found one")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("serve.tls_client_ca: expected serve.tls_cert and serve.tls_key too (mutual TLS is "
                              "TLS first), found neither")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"serve.{name}: expected a PEM file, found no file at {path}")
        return self

    @classmethod
    def from_toml(cls, path: Path | None, **overrides) -> "ServeConfig":
        """The ``[serve]`` table of ``path`` (every key optional), then ``overrides`` (flags given)."""
        table: dict = {}
        if path is not None:
            try:
                with open(path, "rb") as handle:
                    table = tomllib.load(handle).get("serve", {})
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: expected TOML, found a syntax error: {exc}") from exc
        table.update({k: v for k, v in overrides.items() if v is not None})
        return from_dict(cls, table, "serve").check()

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0
