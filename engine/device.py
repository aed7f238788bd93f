"""Moving host arrays to the engine's device.

The engine's device is decided once, at the boundary (:func:`resolve_device`), and every decoded
column goes through :func:`to_device`:

- device "cpu": host tensors pass through untouched (zero-copy views, possibly of read-only Arrow
  memory), and a CUDA tensor comes back to the host.
- a CUDA device: tensors already there pass through; a tensor on another GPU is copied peer to
  peer; host tensors go through a :class:`HostToDevice`, which stages them in pinned host memory
  that it keeps and grows (never a fresh allocation per batch) and copies them on a side CUDA
  stream with ``non_blocking=True``, so the copy of batch n+1 overlaps the work on batch n.

Stream safety (the pattern of PyTorch's CUDA semantics notes): the device tensor is allocated on
the side stream and written there; the caller's current stream then waits for the side stream
(``wait_stream``) and the tensor is marked as used by the current stream (``record_stream``), so
the caching allocator never hands its memory to a later side-stream allocation while kernels on
the current stream may still read it. A staging buffer is overwritten only after the event
recorded behind its last copy has completed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

# Staging buffers grow to at least this factor of their old size, so a slowly growing batch size
# costs a logarithmic number of pinned allocations (cudaHostAlloc is slow: milliseconds per call).
_GROWTH = 1.5
# ... and to a whole number of these, so small batches of varying size share one buffer.
_ROUND_BYTES = 1 << 20


def resolve_device(device) -> torch.device:
    """The engine's device from ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises ValueError naming ``device`` for other kinds, and when CUDA is asked for where there is
    none (a silent fall-back to the CPU would hide a deployment mistake and cost a factor of ten).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', found {device!r}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', found {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device: expected a CUDA device to be present for {device!r}, found none "
                         "(torch.cuda.is_available() is False)")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device: expected a CUDA index in [0, {count}), found {device!r}")
    return torch.device("cuda", index)


@dataclasses.dataclass
class TransferStats:
    """Counters of one :class:`HostToDevice` (read by tests and metrics).

    ``pinned_allocations``: staging buffers allocated or grown; ``staged_bytes``: bytes copied
    into staging; ``copies``: host-to-device copies issued; ``direct_copies``: those made straight
    from a tensor that was already pinned (no staging).
    """

    pinned_allocations: int = 0
    pinned_bytes: int = 0
    staged_bytes: int = 0
    copies: int = 0
    direct_copies: int = 0


class HostToDevice:
    """Copies host tensors to one CUDA device through reused pinned buffers on a side stream.

    One staging buffer per *slot* (a name such as ``"logits"``; each column of a batch has its
    own, so the columns of one batch never wait for each other). Thread-safe: calls on one
    instance are serialised by a lock, which also keeps two threads from filling one staging
    buffer at once.

    Args:
        device: the target CUDA device.
        stream: the side stream to copy on (default: a new stream on ``device``).
    """

    def __init__(self, device, stream: torch.cuda.Stream | None = None):
        dev = resolve_device(device)
        if dev.type != "cuda":
            raise ValueError(f"device: expected a CUDA device for HostToDevice, found {device!r}")
        self.device = dev
        self.stream = stream if stream is not None else torch.cuda.Stream(device=dev)
        if self.stream.device != dev:
            raise ValueError(f"stream: expected a stream on {dev}, found one on {self.stream.device}")
        self.stats = TransferStats()
        self._staging: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.cuda.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, tensor: torch.Tensor, slot: str = "default") -> torch.Tensor:
        """``tensor`` on this device (see :meth:`move`)."""
        moved = self.move({slot: tensor})[slot]
        assert moved is not None  # only None passes through as None
        return moved

    def move(self, tensors: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Copy several tensors (slot name -> tensor, None passes through) in one go.

        Host tensors are staged and copied on the side stream; the caller's current stream on
        this device waits for those copies, so results can be used at once on the current
        stream without a host synchronisation. Tensors already on this device pass through;
        tensors on another GPU are copied on the current stream. Results are contiguous.
        A host tensor that is already pinned is copied straight from its memory (no staging):
        the caller must not overwrite it before the current stream has passed this point.
        """
        out: dict[str, torch.Tensor | None] = {}
        host: dict[str, torch.Tensor] = {}
        for slot, t in tensors.items():
            if t is None or t.device == self.device:
                out[slot] = t if t is None else t.contiguous()
            elif t.is_cuda:
                out[slot] = t.to(self.device).contiguous()
            else:
                host[slot] = t
        if host:
            with self._lock:
                out.update(self._copy_host(host))
        return {slot: out[slot] for slot in tensors}

    def _copy_host(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sources = {slot: self._stage(slot, t) for slot, t in host.items()}
        current = torch.cuda.current_stream(self.device)
        results = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for slot, src in sources.items():
                dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
                dst.copy_(src, non_blocking=True)
                results[slot] = dst
            done = torch.cuda.Event()
            done.record(self.stream)
        for slot in sources:
            self._pending[slot] = done
        current.wait_stream(self.stream)
        for dst in results.values():
            # dst was allocated on the side stream but is consumed on the current one: without
            # this the allocator could recycle it for the next batch's copy while still in use.
            dst.record_stream(current)
        self.stats.copies += len(results)
        return results

    def _stage(self, slot: str, t: torch.Tensor) -> torch.Tensor:
        """A pinned tensor holding ``t``'s values: ``t`` itself when already pinned."""
        if t.is_contiguous() and t.is_pinned():
            # Memory pinned by torch's host allocator is tracked by it across async copies (a
            # non-contiguous one would go through an unpinned temporary, so it is staged).
            self.stats.direct_copies += 1
            return t
        nbytes = t.numel() * t.element_size()
        pending = self._pending.pop(slot, None)
        if pending is not None:
            # The previous copy out of this buffer may still be in flight: wait for it before
            # overwriting (usually long done, as the batch's compute took longer than the copy).
            pending.synchronize()
        buf = self._staging.get(slot)
        if buf is None or buf.numel() < nbytes:
            old = 0 if buf is None else buf.numel()
            size = max(nbytes, int(old * _GROWTH), 1)
            size = -(-size // _ROUND_BYTES) * _ROUND_BYTES
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._staging[slot] = buf
            self.stats.pinned_allocations += 1
            self.stats.pinned_bytes += size - old
            logger.debug("pinned staging buffer %r grown to %d bytes", slot, size)
        staged = buf[:nbytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        self.stats.staged_bytes += nbytes
        return staged

    def staging_buffer(self, slot: str) -> torch.Tensor | None:
        """The pinned uint8 staging buffer of ``slot`` (None before its first copy)."""
        return self._staging.get(slot)

    def synchronize(self) -> None:
        """Block until every copy issued so far has completed."""
        self.stream.synchronize()


_DEFAULT: dict[int, HostToDevice] = {}
_DEFAULT_LOCK = threading.Lock()


def default_transfer(device) -> HostToDevice:
    """The process-wide :class:`HostToDevice` of a CUDA device (created on first use)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, found {device!r}")
    with _DEFAULT_LOCK:
        transfer = _DEFAULT.get(dev.index)
        if transfer is None:
            transfer = _DEFAULT[dev.index] = HostToDevice(dev)
        return transfer


def to_device(tensors: Mapping[str, torch.Tensor | None], device, *,
              transfer: HostToDevice | None = None) -> dict[str, torch.Tensor | None]:
    """Put each tensor (slot name -> tensor or None) on ``device``.

    On the CPU, host tensors are returned as they are (zero-copy; they may be non-contiguous or
    read-only views) and CUDA tensors are copied back to the host. On a CUDA device the copies go
    through ``transfer`` (default: :func:`default_transfer` of the device).
    """
    dev = resolve_device(device)
    if dev.type == "cpu":
        return {slot: t if t is None or t.device.type == "cpu" else t.cpu() for slot, t in tensors.items()}
    if transfer is None:
        transfer = default_transfer(dev)
    elif transfer.device != dev:
        raise ValueError(f"transfer: expected a HostToDevice for {dev}, found one for {transfer.device}")
    return transfer.move(tensors)


__all__ = ["HostToDevice", "TransferStats", "default_transfer", "resolve_device", "to_device"]
