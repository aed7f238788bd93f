"""The latent world of a simulated fleet: everything drawn once per seed (class means and priors,
unseen classes, drift directions, the ensemble's heads, source traffic).

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

Internal to :mod:`hitl_triage.serve.sim`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .config import STREAM_WORLD, FleetConfig


@dataclass(frozen=True)
class World:
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
def build_world(config: FleetConfig) -> World:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(config.seed, spawn_key=(STREAM_WORLD,))))
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

    return World(
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
