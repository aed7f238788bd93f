"""What a user would use instead of our passes, written the straightforward way or called through
the peer library as its documentation shows. Each peer is measured on the same inputs as ours.

A peer that cannot be imported is never dropped: :func:`load_peer` returns the reason, which the
suite writes into the table as "not installed: <why>".
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np

SIGNAL_FIELDS = (
    "predicted_class", "confidence", "margin", "total_entropy", "expected_entropy",
    "mutual_info", "vote_agreement", "valid",
)

# -- the signal pass, straightforwardly ---------------------------------------------------------


def numpy_signals(logits: np.ndarray, temperature: float) -> dict:
    """The signal pass as a user would write it in vectorised numpy (float32 arithmetic; float16
    input is upcast first, since numpy has no fast half-precision math). Same definitions as
    ``hitl_triage.kernels.signals.reference``."""
    z = np.asarray(logits, dtype=np.float32)
    valid = np.isfinite(z).all(axis=(1, 2))
    z = np.where(valid[:, None, None], z, np.float32(0)) / np.float32(temperature)
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    member = e / e.sum(axis=2, keepdims=True)                     # [B, M, C]
    p = member.mean(axis=1)                                       # [B, C]
    predicted = p.argmax(axis=1)
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    confidence = top2[:, 1]
    margin = top2[:, 1] - top2[:, 0]
    total = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
    expected = -(member * np.log(np.where(member > 0, member, 1))).sum(axis=2).mean(axis=1)
    mutual_info = np.maximum(total - expected, 0)
    vote = (z.argmax(axis=2) == predicted[:, None]).mean(axis=1)
    nan = np.float32(np.nan)
    return {
        "predicted_class": np.where(valid, predicted, -1).astype(np.int32),
        "confidence": np.where(valid, confidence, nan),
        "margin": np.where(valid, margin, nan),
        "total_entropy": np.where(valid, total, nan),
        "expected_entropy": np.where(valid, expected, nan),
        "mutual_info": np.where(valid, mutual_info, nan),
        "vote_agreement": np.where(valid, vote, nan).astype(np.float32),
        "valid": valid,
    }


def torch_signals(z, temperature: float) -> dict:
    """The same formulas in torch eager (float32 arithmetic; float16/bfloat16 upcast first on the
    CPU, where torch's half-precision kernels are slow or missing; kept as is on CUDA)."""
    import torch

    if z.device.type == "cpu" or z.dtype == torch.float64:
        z = z.float()
    valid = torch.isfinite(z).all(dim=2).all(dim=1)
    z = torch.where(valid[:, None, None], z, torch.zeros((), dtype=z.dtype, device=z.device)) / temperature
    member = torch.softmax(z.float(), dim=2)
    p = member.mean(dim=1)
    top2 = torch.topk(p, 2, dim=1).values
    predicted = p.argmax(dim=1)
    total = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1)
    expected = -(member * torch.log(torch.where(member > 0, member, torch.ones_like(member)))).sum(dim=2).mean(dim=1)
    mutual_info = torch.clamp(total - expected, min=0)
    vote = (z.argmax(dim=2) == predicted[:, None]).float().mean(dim=1)
    nan = torch.full_like(total, float("nan"))
    return {
        "predicted_class": torch.where(valid, predicted, torch.full_like(predicted, -1)).int(),
        "confidence": torch.where(valid, top2[:, 0], nan),
        "margin": torch.where(valid, top2[:, 0] - top2[:, 1], nan),
        "total_entropy": torch.where(valid, total, nan),
        "expected_entropy": torch.where(valid, expected, nan),
        "mutual_info": torch.where(valid, mutual_info, nan),
        "vote_agreement": torch.where(valid, vote, nan),
        "valid": valid,
    }


# -- peer libraries ------------------------------------------------------------------------------


class PeerMissing(Exception):
    """A peer cannot run here; the message is the reason that goes into the table."""


def load_peer(name: str):
    """Import a peer's entry point, or raise :class:`PeerMissing` with the reason.

    ``name``: "sklearn" (NearestNeighbors), "pytorch-ood" (detector.KNN), "cleanlab"
    (outlier.OutOfDistribution), "netcal" (scaling.TemperatureScaling).
    """
    try:
        if name == "sklearn":
            from sklearn.neighbors import NearestNeighbors

            return NearestNeighbors
        if name == "cleanlab":
            from cleanlab.outlier import OutOfDistribution

            return OutOfDistribution
        if name == "netcal":
            from netcal.scaling import TemperatureScaling

            return TemperatureScaling
        if name == "pytorch-ood":
            return _pytorch_ood_knn()
    except PeerMissing:
        raise
    except ImportError as exc:
        raise PeerMissing(f"not installed: {exc} (pip install -e '.[bench]')") from exc
    raise ValueError(f"name: expected sklearn, pytorch-ood, cleanlab or netcal, found {name!r}")


# Set when pytorch-ood's KNN had to be loaded past its package __init__ (see below).
PYTORCH_OOD_NOTE = ""
_PYTORCH_OOD_KNN = None


def _pytorch_ood_knn():
    """pytorch-ood's KNN detector.

    pytorch-ood's package ``__init__`` imports torchvision (for its image models and data sets);
    the only torchvision on PyPI for torch 2.13 is a CUDA build that fails to load next to a CPU
    torch, and installing pytorch-ood with its dependencies replaces torch with a CUDA one. The KNN
    detector itself needs only torch and scikit-learn, so when torchvision is missing we load
    ``pytorch_ood.detector.knn`` (unchanged) with its two parent packages as empty shells, and say
    so in the table's notes.
    """
    global PYTORCH_OOD_NOTE, _PYTORCH_OOD_KNN
    if _PYTORCH_OOD_KNN is not None:
        return _PYTORCH_OOD_KNN
    try:
        from pytorch_ood.detector import KNN

        PYTORCH_OOD_NOTE = ""
        _PYTORCH_OOD_KNN = KNN
        return KNN
    except ImportError as exc:
        if "torchvision" not in str(exc):
            raise
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None or not spec.submodule_search_locations:
        raise PeerMissing("not installed: pytorch-ood (pip install --no-deps pytorch-ood)")
    for key in [k for k in sys.modules if k == "pytorch_ood" or k.startswith("pytorch_ood.")]:
        del sys.modules[key]  # the half-imported package from the failed attempt
    root = list(spec.submodule_search_locations)[0]
    for pkg, path in (("pytorch_ood", root), ("pytorch_ood.detector", f"{root}/detector")):
        shell = types.ModuleType(pkg)
        shell.__path__ = [path]
        sys.modules[pkg] = shell
    try:
        module = importlib.import_module("pytorch_ood.detector.knn")
    except ImportError as exc:
        raise PeerMissing(f"not installed: pytorch-ood's KNN could not be loaded without torchvision: {exc}") from exc
    PYTORCH_OOD_NOTE = "pytorch_ood.detector.knn loaded without the package __init__ (torchvision absent)"
    _PYTORCH_OOD_KNN = module.KNN
    return module.KNN


# -- temperature scaling, the common reference way -----------------------------------------------


def torch_lbfgs_temperature(logits: np.ndarray, labels: np.ndarray, *, init: float = 1.5) -> float:
    """One temperature by LBFGS on the NLL, as the widely copied reference implementation does
    (gpleiss/temperature_scaling: a parameter initialised at 1.5, LBFGS lr=0.01, max_iter=50),
    generalised to ensembles the way our model is defined: the temperature divides every member's
    logits before its softmax and the prediction is the mean of the member probabilities.
    ``logits`` [N, M, C], ``labels`` [N]."""
    import torch

    z = torch.from_numpy(np.array(logits, dtype=np.float32))  # a writable copy (Arrow buffers are read-only)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    temperature = torch.nn.Parameter(torch.full((1,), init))
    optimiser = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)
    members = z.shape[1]

    def nll():
        optimiser.zero_grad()
        if members == 1:
            loss = torch.nn.functional.cross_entropy(z[:, 0] / temperature, y)
        else:
            logp = torch.log_softmax(z / temperature, dim=2)                       # [N, M, C]
            log_mean = torch.logsumexp(logp, dim=1) - np.log(members)              # log mean_m p_m
            loss = torch.nn.functional.nll_loss(log_mean, y)
        loss.backward()
        return loss

    optimiser.step(nll)
    return float(temperature.detach())
