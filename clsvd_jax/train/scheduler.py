"""The task scheduler: what happens at a task boundary of the constrained method (docs/design.md §3, §4, §4b).

Before each task the scheduler

1. measures block importance on a calibration batch: the cosine between every block's input and output hidden
   state, averaged over the non-pad tokens, turned into ``1 - cos`` (default) or ``cos`` and min-max normalised
   across all blocks of the model to [0, 1];
2. turns it into protected ranks with the configured rank policy (``importance``, ``schedule``, ``energy``,
   ``none``; ranks never shrink and leave ``min_trainable`` directions free);
3. accumulates the subspaces with ``compute_subspaces(..., previous=get_subspaces(opt_state))`` (new directions
   from the complement part of W, or from the finished tasks' input covariances) and installs them with
   ``set_subspaces`` (same shapes, so the jitted train step does not recompile);
4. records per task and matrix the protected rank, the block importance and the captured fraction of spectral
   energy ``1 - ||P(W)||^2 / ||W||^2``.

The measurements (block cosines, spectra) are here; the rank arithmetic they feed (retention ratios, clipping,
energy extension, capacity) is in ``clsvd_jax._src.rank_policy``. The scheduler is a plain object whose state
round-trips through ``to_dict`` / ``from_dict`` (JSON), saved with every checkpoint; the subspaces themselves live
in the optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clsvd_jax as cj
from clsvd_jax._src import linalg
from clsvd_jax._src import rank_policy as rp
from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax.config import OsftConfig

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------------
# Block importance
# ---------------------------------------------------------------------------------------------------------------


@jax.jit
def _cosine_sums(inputs: jax.Array, outputs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per block: the sum over real tokens of cos(input, output), and the number of real tokens."""
  a = inputs.astype(jnp.float32)
  b = outputs.astype(jnp.float32)
  dot = jnp.sum(a * b, -1)
  norms = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  cos = dot / jnp.maximum(norms, 1e-12)
  m = mask.astype(jnp.float32)[None]
  return jnp.sum(cos * m, axis=(1, 2)), jnp.sum(m, axis=(1, 2)) * jnp.ones(cos.shape[0])


def block_cosines(hidden: Mapping[str, tuple[Any, Any]], masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Mean cosine between each block's input and output over non-pad tokens, ``{stack: [L]}``.

  Args:
    hidden: ``{stack: (inputs, outputs)}`` with arrays ``[L, B, T, D]`` (``clsvd_jax.models.block_hidden_states``).
    masks: ``{stack: [B, T]}`` non-pad masks.
  """
  out = {}
  for stack, (inputs, outputs) in hidden.items():
    sums, counts = _cosine_sums(inputs, outputs, jnp.asarray(masks[stack]))
    out[stack] = np.asarray(sums) / np.maximum(np.asarray(counts), 1.0)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Spectra the energy policy and the records read (the rank arithmetic is in clsvd_jax._src.rank_policy)
# ---------------------------------------------------------------------------------------------------------------


def _fro2(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=(-2, -1))


@jax.jit
def _energy_parts(w: jax.Array, sub: cj.Subspace) -> tuple[jax.Array, jax.Array]:
  w = w.astype(jnp.float32)
  return _fro2(w), _fro2(cj.project(w, sub, "both"))


def weight_energy(w: Any, sub: cj.Subspace) -> np.ndarray:
  """Fraction of ``||W||_F^2`` inside the protected subspace, ``1 - ||P(W)||^2 / ||W||^2`` per stacked matrix."""
  total, rest = (np.asarray(x, np.float64) for x in _energy_parts(jnp.asarray(w), sub))
  return np.where(total > 0, 1.0 - rest / np.where(total > 0, total, 1.0), 0.0)


@jax.jit
def _weight_spectrum(w: jax.Array, prev: cj.Subspace | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  w = w.astype(jnp.float32)
  total = _fro2(w)
  r = w if prev is None else cj.project(w, prev, "both")
  rest = _fro2(r)
  return total - rest, linalg.svd(r, compute_uv=False), total


def _complement_spectrum(w: Any, prev: cj.Subspace | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(protected energy, complement singular values, total energy) of W under the previous subspace."""
  return tuple(np.asarray(x, np.float64) for x in _weight_spectrum(jnp.asarray(w), prev))


@jax.jit
def _cov_spectrum(cov: jax.Array, prev: cj.Subspace | None) -> tuple[jax.Array, jax.Array]:
  c = cov.astype(jnp.float32)
  total = jnp.trace(c, axis1=-2, axis2=-1)
  if prev is not None:
    # (I - VV^T) C (I - VV^T): project rows and columns onto the right complement.
    c = cj.complement_right(prev, jnp.swapaxes(cj.complement_right(prev, c), -1, -2))
  return total, linalg.eigvalsh(0.5 * (c + jnp.swapaxes(c, -1, -2)))


def _covariance_spectrum(cov: Any, prev: cj.Subspace | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(protected energy, sqrt of the complement eigenvalues, total energy) of an input covariance [..., n, n]."""
  total, evals = _cov_spectrum(jnp.asarray(cov), prev)
  total = np.asarray(total, np.float64)
  evals = np.clip(np.asarray(evals, np.float64)[..., ::-1], 0.0, None)
  return total - evals.sum(-1), np.sqrt(evals), total


# ---------------------------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------------------------


def _to_list(x: Any) -> Any:
  x = np.asarray(x)
  return x.tolist()


@dataclasses.dataclass
class BoundaryInputs:
  """What a task boundary may measure.

  Attributes:
    hidden_states: callable ``batch -> {stack: (in, out)}`` for block importance (the current parameters).
    token_masks: callable ``(stack, batch) -> [B, T]`` non-pad mask.
    importance_batches: calibration batches (training layout) for block importance.
    covariances: ``{path: [..., n, n]}`` input covariances of the finished task (activations basis source).
  """

  hidden_states: Callable[[Mapping[str, Any]], Mapping[str, tuple[Any, Any]]] | None = None
  token_masks: Callable[[str, Mapping[str, Any]], Any] | None = None
  importance_batches: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)
  covariances: Mapping[str, Any] | None = None


class TaskScheduler:
  """Computes and installs protected subspaces at task boundaries (see the module docstring).

  Args:
    config: the ``osft`` section (rank policy, basis source, start task, moments).
    shapes: ``{path: shape}`` of the constrained matrices.
    num_tasks: tasks in the stream.
    compute_fn: ``compute_subspaces`` or a drop-in (e.g. ``clsvd_jax.parallel.compute_subspaces_sharded`` bound
      to a mesh); called as ``compute_fn(params, ranks, previous=..., covariances=...)``.
  """

  def __init__(self, config: OsftConfig, shapes: Mapping[str, Shape], num_tasks: int,
               compute_fn: Callable[..., Any] | None = None):
    self.config = config
    self.compute_fn = compute_fn or cj.compute_subspaces
    self.shapes = {p: tuple(int(d) for d in s) for p, s in shapes.items()}
    self.num_tasks = int(num_tasks)
    self.next_task = 0
    self.ranks: dict[str, np.ndarray] = {p: np.zeros(s[:-2], np.int32) for p, s in self.shapes.items()}
    self.records: list[dict[str, Any]] = []

  # -- state ------------------------------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable state (ranks so far, per-task records, the next task)."""
    return {"next_task": self.next_task, "num_tasks": self.num_tasks,
            "ranks": {p: _to_list(k) for p, k in self.ranks.items()}, "records": self.records,
            "shapes": {p: list(s) for p, s in self.shapes.items()}}

  @classmethod
  def from_dict(cls, config: OsftConfig, state: Mapping[str, Any],
                compute_fn: Callable[..., Any] | None = None) -> TaskScheduler:
    """Rebuilds a scheduler from ``to_dict`` output.

    Raises:
      ValueError: when the saved shapes differ from the model's (a checkpoint of another model).
    """
    shapes = {p: tuple(s) for p, s in state["shapes"].items()}
    out = cls(config, shapes, state["num_tasks"], compute_fn)
    out.next_task = int(state["next_task"])
    out.ranks = {p: np.asarray(k, np.int32) for p, k in state["ranks"].items()}
    out.records = list(state["records"])
    return out

  def protects_before(self, task_index: int) -> bool:
    """Whether the boundary before ``task_index`` (0-based) installs subspaces."""
    return task_index >= self.config.start_protecting_from - 1 and self.config.rank_policy.name != "none"

  # -- ranks ------------------------------------------------------------------------------------------------

  def measure_importance(self, inputs: BoundaryInputs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """``(cosines, normalised importance)`` per stack, averaged over the calibration batches (token-weighted)."""
    if inputs.hidden_states is None or not inputs.importance_batches:
      return None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for batch in inputs.importance_batches:
      hidden = inputs.hidden_states(batch)
      for stack, (a, b) in hidden.items():
        mask = jnp.asarray(inputs.token_masks(stack, batch))
        s, c = _cosine_sums(a, b, mask)
        sums[stack] = sums.get(stack, 0.0) + np.asarray(s, np.float64)
        counts[stack] = counts.get(stack, 0.0) + np.asarray(c, np.float64)
    cosines = {k: sums[k] / np.maximum(counts[k], 1.0) for k in sums}
    raw = rp.importance_from_cosines(cosines, self.config.rank_policy.importance_direction)
    return cosines, rp.normalize_importance(raw)

  def _policy_ranks(self, task_index: int, params_flat: Mapping[str, Any], previous: Mapping[str, cj.Subspace],
                    importance: Mapping[str, np.ndarray] | None,
                    covariances: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    cfg = self.config.rank_policy
    mt = self.config.min_trainable
    prev = self.ranks
    if cfg.name == "none":
      return {p: k.copy() for p, k in prev.items()}
    if cfg.name == "importance":
      if importance is None:
        raise ValueError("rank policy 'importance' needs a calibration batch to measure block importance")
      imp = rp.importance_by_matrix(importance, self.shapes)
      if cfg.growth == "incremental":
        return rp.incremental_importance_ranks(imp, self.shapes, mrr=cfg.mrr, trr=cfg.trr, previous=prev,
                                            min_trainable=mt)
      return cj.importance_ranks(imp, self.shapes, mrr=cfg.mrr, trr=cfg.trr, previous=prev, min_trainable=mt)
    if cfg.name == "schedule":
      return cj.schedule_ranks(task_index, self.shapes, rate=cfg.rate, max_ratio=cfg.max_ratio, previous=prev,
                               min_trainable=mt)
    # energy: extend each subspace until it holds eps of the energy of W (or of the input covariance)
    out = {}
    for path, shape in self.shapes.items():
      sub = previous.get(path)
      if covariances is not None and path in covariances:
        have, spectrum, total = _covariance_spectrum(covariances[path], sub)
      else:
        have, spectrum, total = _complement_spectrum(params_flat[path], sub)
      k = np.asarray(prev[path], np.int64) + rp.energy_extension(have, spectrum, total, cfg.eps)
      out[path] = rp.finish_ranks(path, k, shape, prev, mt)
    return out

  # -- the boundary -----------------------------------------------------------------------------------------

  def before_task(self, task_index: int, params: Any, opt_state: Any, inputs: BoundaryInputs | None = None) -> Any:
    """Runs the boundary before ``task_index`` and returns the optimizer state with the new subspaces.

    Args:
      task_index: 0-based index of the task about to be trained.
      params: the current parameters (a nested dict like the model's).
      opt_state: the optimizer state (holding the previous subspaces).
      inputs: calibration measurements (see ``BoundaryInputs``).

    Returns:
      ``opt_state`` with the accumulated subspaces installed (unchanged when this boundary protects nothing).
    """
    inputs = inputs or BoundaryInputs()
    record: dict[str, Any] = {"task": task_index, "protected": False, "policy": self.config.rank_policy.name,
                              "basis_source": self.config.basis_source}
    measured = self.measure_importance(inputs)
    normalized = None
    if measured is not None:
      cosines, normalized = measured
      record["block_cosine"] = {k: _to_list(v) for k, v in cosines.items()}
      record["importance"] = {k: _to_list(v) for k, v in normalized.items()}
    if self.protects_before(task_index):
      params_flat = cj.flatten_with_paths(params)
      missing = sorted(set(self.shapes) - set(params_flat))
      if missing:
        raise ValueError(f"constrained matrices missing from params: {missing[:5]}")
      previous_tree = cj.get_subspaces(opt_state)
      previous = subspace_lib.subspaces_by_path(previous_tree)
      covs = None
      if self.config.basis_source == "activations":
        covs = {p: c for p, c in (inputs.covariances or {}).items() if p in self.shapes}
        if not covs:
          raise ValueError("basis_source 'activations' needs the input covariances of the finished task; the "
                           "model family must expose matrix inputs (clsvd_jax.models.matrix_input_covariances)")
      ranks = self._policy_ranks(task_index, params_flat, previous, normalized, covs)
      for path, k in ranks.items():
        # A capacity set by max_rank_ratio bounds what a side can hold; stay inside it.
        sub = previous.get(path)
        cap = rp.capacity_rank(self.shapes[path], None if sub is None else sub.capacity)
        ranks[path] = np.maximum(np.minimum(k, cap), self.ranks[path]).astype(np.int32)
      subs = self.compute_fn(params, ranks, previous=previous_tree,
                                  covariances=covs or None)
      opt_state = cj.set_subspaces(opt_state, subs)
      new_flat = subspace_lib.subspaces_by_path(subs)
      self.ranks = {p: np.asarray(ranks[p], np.int32) for p in self.shapes}
      record["protected"] = True
      record["energy"] = {p: _to_list(weight_energy(params_flat[p], new_flat[p])) for p in self.shapes}
    record["ranks"] = {p: _to_list(k) for p, k in self.ranks.items()}
    record["rank_ratio"] = {p: _to_list(np.asarray(k, np.float64) / min(self.shapes[p][-2:]))
                            for p, k in self.ranks.items()}
    self.records = [r for r in self.records if r["task"] != task_index] + [record]
    self.next_task = task_index + 1
    return opt_state


def reset_moments(tx: optax.GradientTransformation, params: Any, opt_state: Any) -> Any:
  """A fresh optimizer state (zero moments, step count 0) that keeps the installed subspaces."""
  fresh = tx.init(params)
  return cj.set_subspaces(fresh, cj.get_subspaces(opt_state))
