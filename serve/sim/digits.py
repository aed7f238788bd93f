"""A real-data fleet for `triage demo --data digits`: scikit-learn's handwritten digits (shipped
with the package, no download), an ensemble of small MLPs trained in seconds, and the same four
files the simulator writes (fleet, calibration, bank, truth), so everything downstream is shared.

- In distribution: digits 0-7 (C = 8). Out of distribution: digits 8 and 9, which the models never
  saw ("unseen_class"), and noisy or blanked images ("corrupted").
- Images are split before anything else (train / calibration / fleet), and each split is grown
  with one-pixel shifts of its own images, so no image leaks across splits.
- The members are small MLPs; on clean digits they come out nearly calibrated (T ~ 0.9-1.2).
- Embeddings: the 64-unit hidden layer of the first member (the usual "penultimate features" of
  k-NN OOD detection). Bank: the training images' embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .encode import TRUTH_SCHEMA
from .parquet import FleetFiles, fleet_paths

logger = logging.getLogger(__name__)

IN_CLASSES = 8
HIDDEN = 64
SOURCES = ("scanner-a", "scanner-b", "scanner-c")
TRAIN_STEPS = 200  # full-batch Adam steps per member: ~1 s each on one core, 97-98% accuracy


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the demo extra
        raise RuntimeError("--data digits needs scikit-learn: pip install 'hitl-triage[demo]'") from exc
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _shifted(images: np.ndarray) -> np.ndarray:
    """The images and their four one-pixel shifts (zero fill), 5x the rows."""
    out = [images]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(images, step, axis=axis)
        index: list[slice | int] = [slice(None)] * 3
        index[axis] = 0 if step == 1 else -1
        moved[tuple(index)] = 0.0
        out.append(moved)
    return np.concatenate(out)


class _Member(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU())
        self.head = torch.nn.Linear(HIDDEN, IN_CLASSES)

    def forward(self, x):
        h = self.hidden(x)
        return self.head(h), h


def _train_members(x: np.ndarray, y: np.ndarray, members: int, seed: int) -> list[_Member]:
    """Each member on its own bootstrap sample. Small MLPs on clean digits come out nearly
    calibrated (fitted T of 0.9-1.2), unlike the deliberately overconfident simulator: real data.
    One torch thread: 64x64 matrices gain nothing from more, and on a busy machine extra threads
    cost up to 50x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [_train_member(x, y, seed * 1000 + m) for m in range(members)]
    finally:
        torch.set_num_threads(threads)


def _train_member(x: np.ndarray, y: np.ndarray, member_seed: int) -> _Member:
    torch.manual_seed(member_seed)
    pick = np.random.default_rng(member_seed).integers(0, len(x), len(x))  # bootstrap sample
    xb, yb = torch.from_numpy(x[pick]), torch.from_numpy(y[pick])
    model = _Member()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(TRAIN_STEPS):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb)[0], yb)
        loss.backward()
        optimiser.step()
    return model.eval()


def _predict(models: list[_Member], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        xt = torch.from_numpy(x)
        logits = torch.stack([m(xt)[0] for m in models], dim=1)
        embedding = models[0](xt)[1]
    return logits.numpy().astype(np.float32), embedding.numpy().astype(np.float32)


def _vectors(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _table(ids, logits, embedding, source, category, label=None) -> pa.Table:
    n, members, classes = logits.shape
    flat = pa.array(logits.reshape(-1), pa.float32())
    columns = {
        "id": pa.array(ids, pa.string()),
        "logits": pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, classes), members),
        "embedding": _vectors(embedding),
        "source": pa.array(source, pa.string()),
        "category": pa.array(category, pa.string()),
    }
    if label is not None:
        columns["label"] = pa.array(label, pa.int32())
    return pa.table(columns)


def make_digits_files(out_path: str | Path, *, members: int = 5, seed: int = 0) -> FleetFiles:
    """Train the ensemble and write fleet / calibration / bank / truth files beside ``out_path``."""
    images, labels = _load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    inside = labels < IN_CLASSES
    in_images, in_labels = images[inside], labels[inside]
    ood_images = images[~inside]
    n = len(in_images)
    train, calib, fleet = np.split(np.arange(n), [n // 2, (3 * n) // 4])

    def grown(idx):
        return _shifted(in_images[idx]).reshape(-1, 64), np.tile(in_labels[idx], 5)

    x_train, y_train = grown(train)
    models = _train_members(x_train, y_train, members, seed)

    x_cal, y_cal = grown(calib)
    x_in, y_in = grown(fleet)
    x_unseen = _shifted(ood_images).reshape(-1, 64)
    x_unseen = x_unseen[rng.choice(len(x_unseen), size=len(x_in) // 10, replace=False)]  # ~8% of the fleet
    corrupt = x_in[rng.choice(len(x_in), size=len(x_in) // 10, replace=False)].copy()
    half = len(corrupt) // 2
    corrupt[:half] = np.clip(corrupt[:half] + rng.normal(0, 0.6, corrupt[:half].shape), 0, 1)  # sensor noise
    corrupt[half:, rng.permutation(64)[:40]] = 0.0  # mostly blank scans
    x_fleet = np.concatenate([x_in, x_unseen, corrupt]).astype(np.float32)
    kind = np.array(["in_distribution"] * len(x_in) + ["unseen_class"] * len(x_unseen) + ["corrupted"] * len(corrupt))
    truth_label = np.concatenate([y_in, np.full(len(x_unseen) + len(corrupt), -1)])
    shuffle = rng.permutation(len(x_fleet))
    x_fleet, kind, truth_label = x_fleet[shuffle], kind[shuffle], truth_label[shuffle]

    files = fleet_paths(out_path)
    files.fleet.parent.mkdir(parents=True, exist_ok=True)
    logits, embedding = _predict(models, x_fleet)
    ids = [f"digit-{i:06d}" for i in range(len(x_fleet))]
    source = rng.choice(SOURCES, size=len(x_fleet))
    category = np.where(rng.random(len(x_fleet)) < 0.03, "medical", "general")
    pq.write_table(_table(ids, logits, embedding, source, category), files.fleet)
    predicted = logits.astype(np.float64)
    mean_prob = np.exp(predicted - predicted.max(axis=2, keepdims=True))
    mean_prob = (mean_prob / mean_prob.sum(axis=2, keepdims=True)).mean(axis=1)
    is_ood = truth_label < 0
    is_error = is_ood | (mean_prob.argmax(axis=1) != truth_label)
    pq.write_table(
        pa.table({"id": ids, "label": truth_label.astype(np.int32), "is_ood": is_ood, "is_error": is_error, "kind": kind},
                 schema=TRUTH_SCHEMA),
        files.truth,
    )
    cal_logits, cal_embedding = _predict(models, x_cal)
    cal_ids = [f"digit-cal-{i:06d}" for i in range(len(x_cal))]
    pq.write_table(
        _table(cal_ids, cal_logits, cal_embedding, rng.choice(SOURCES, size=len(x_cal)),
               np.full(len(x_cal), "general"), y_cal),
        files.calibration,
    )
    _, bank_embedding = _predict(models, x_train)
    pq.write_table(
        pa.table({"id": [f"digit-bank-{i:06d}" for i in range(len(x_train))],
                  "embedding": _vectors(bank_embedding),
                  "label": pa.array(y_train, pa.int32())}),
        files.bank,
    )
    logger.info("digits: %d fleet rows (%d OOD), %d calibration, %d bank", len(x_fleet), int(is_ood.sum()), len(x_cal), len(x_train))
    return files
