"""Backend choice for the fused passes, decided once at the boundary.

Every pass (``signals``, ``knn``, ``audit``) registers its backends here by name. A call resolves
its backend from, in order: the ``backend=`` argument, the environment variable
``HITL_TRIAGE_<PASS>_BACKEND`` (for example ``HITL_TRIAGE_SIGNALS_BACKEND=reference``), and
otherwise the first available backend in the pass's preference list for the input's device.

- An explicitly requested backend that is unknown, cannot be imported or cannot serve the input's
  device raises :class:`BackendUnavailable` with the reason.
- An automatic choice that is not the pass's first preference for the device is logged once
  (warning), so a missing numba or triton never silently costs a factor of ten.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Callable

logger = logging.getLogger(__name__)

# What a backend's ``entry`` names: a function for most passes, a table of functions for some
# (calibration's ``CalibrationKernels``); each pass's boundary knows which.
Entry = Any


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (unknown, missing, or wrong device)."""


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of a pass.

    ``module`` holds a function named ``entry``; it is imported on first use only, so a missing
    optional dependency (numba, triton, faiss) costs nothing until that backend is asked for.
    ``devices`` returns the device kinds ("cpu", "cuda") the backend can serve right now.
    """

    name: str
    module: str
    entry: str
    devices: Callable[[], frozenset[str]]


@dataclasses.dataclass
class PassRegistry:
    """The backends of one pass and its preference order per device kind."""

    pass_name: str
    backends: dict[str, Backend]
    preference: dict[str, tuple[str, ...]]
    _loaded: dict[str, Entry] = dataclasses.field(default_factory=dict)
    _import_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    _warned: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    @property
    def env_var(self) -> str:
        return f"HITL_TRIAGE_{self.pass_name.upper()}_BACKEND"

    def _load(self, name: str) -> Entry | None:
        if name in self._loaded:
            return self._loaded[name]
        if name in self._import_errors:
            return None
        backend = self.backends[name]
        try:
            fn = getattr(importlib.import_module(backend.module), backend.entry)
        except ImportError as exc:  # an optional dependency is not installed
            self._import_errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        self._loaded[name] = fn
        return fn

    def resolve(self, device_kind: str, requested: str | None = None) -> tuple[str, Entry]:
        """Return ``(backend name, implementation)`` for inputs on ``device_kind``."""
        source = "backend argument"
        if requested is None:
            requested = os.environ.get(self.env_var) or None
            source = f"environment variable {self.env_var}"
        if requested is not None:
            return requested, self._resolve_explicit(requested, device_kind, source)
        for position, name in enumerate(self.preference.get(device_kind, ())):
            if device_kind not in self.backends[name].devices():
                continue
            fn = self._load(name)
            if fn is None:
                continue
            if position > 0 and (device_kind, name) not in self._warned:
                self._warned.add((device_kind, name))
                skipped = ", ".join(
                    f"{n} ({self._why_not(n, device_kind)})"
                    for n in self.preference[device_kind][:position]
                )
                logger.warning(
                    "%s pass on %s falls back to the %r backend; skipped: %s",
                    self.pass_name, device_kind, name, skipped,
                )
            return name, fn
        raise BackendUnavailable(
            f"no {self.pass_name} backend can serve {device_kind} inputs; tried "
            + ", ".join(
                f"{n} ({self._why_not(n, device_kind)})"
                for n in self.preference.get(device_kind, ())
            )
        )

    def _resolve_explicit(self, name: str, device_kind: str, source: str) -> Entry:
        if name not in self.backends:
            raise BackendUnavailable(
                f"{self.pass_name} backend {name!r} (from the {source}) is unknown; "
                f"expected one of {sorted(self.backends)}"
            )
        if device_kind not in self.backends[name].devices():
            raise BackendUnavailable(
                f"{self.pass_name} backend {name!r} (from the {source}) cannot serve "
                f"{device_kind} inputs: {self._why_not(name, device_kind)}"
            )
        fn = self._load(name)
        if fn is None:
            raise BackendUnavailable(
                f"{self.pass_name} backend {name!r} (from the {source}) could not be imported: "
                f"{self._import_errors[name]}"
            )
        return fn

    def _why_not(self, name: str, device_kind: str) -> str:
        if device_kind not in self.backends[name].devices():
            served = sorted(self.backends[name].devices()) or ["nothing here"]
            return f"serves {', '.join(served)}"
        if self._load(name) is None:
            return self._import_errors[name]
        return "available"

    def available(self, device_kind: str) -> list[str]:
        """Names of the backends that can serve ``device_kind`` inputs on this machine."""
        return [
            name
            for name, backend in self.backends.items()
            if device_kind in backend.devices() and self._load(name) is not None
        ]


def cpu_only() -> frozenset[str]:
    return frozenset({"cpu"})


def cpu_and_cuda() -> frozenset[str]:
    return frozenset({"cpu", "cuda"})


def triton_devices() -> frozenset[str]:
    """Triton compiles for CUDA; under TRITON_INTERPRET=1 it also runs CPU tensors (tests only)."""
    return frozenset({"cuda", "cpu"}) if triton_interpreting() else frozenset({"cuda"})


def cuda_only() -> frozenset[str]:
    return frozenset({"cuda"})
