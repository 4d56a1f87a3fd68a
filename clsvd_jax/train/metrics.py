"""Continual-learning metrics from the accuracy matrix (docs/design.md §9) and the per-matrix invariant ratios.

``R[i, j]`` is the exact-match accuracy on task j after training task i (rows i = 0..T-1, 0-based). With the
baseline ``b[j]`` (the model before any training):

* ``AA`` = mean_j R[T-1, j] (average accuracy after the last task; also the per-task mean accuracy);
* ``BWT`` = mean_{j < T-1} (R[T-1, j] - R[j, j]) (backward transfer; negative = forgetting);
* ``FWT`` = mean_{j >= 1} (R[j-1, j] - b[j]) (forward transfer, as in GEM: what training on tasks 0..j-1 did for
  task j, measured against the model before any training);
* ``forgetting`` = mean_{j < T-1} (max_{i < T-1} R[i, j] - R[T-1, j]) (Chaudhry et al.; the last task cannot
  have been forgotten yet);
* ``pooled_accuracy``: correct answers over all evaluation examples of all tasks after the last task (tasks
  weighted by their size, unlike AA).

Beside exact match, the ``option_rate`` of an evaluation is the share of answers that are one of the task's label
words after the same normalisation: a model that answers "Goood" is wrong and off the label set, one that answers
"Company" for a film is wrong but answering the task. Accuracy near chance with an option rate near 1 is a model
that learnt the format and not the task; an option rate near 0 is one that did not learn the answers at all.

Metrics that need two tasks are ``None`` for a one-task stream, and FWT is ``None`` without a baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax._src.subspace import Subspace
from clsvd_jax.data.normalize import normalize_answer
from clsvd_jax.parallel import distributed


def _matrix(r: Any) -> np.ndarray:
  r = np.asarray(r, np.float64)
  if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < r.shape[0]:
    raise ValueError(f"R must be [rows >= 1, tasks >= rows] (row i = after training task i), got shape {r.shape}")
  return r


def average_accuracy(r: Any) -> float:
  """Mean accuracy over all tasks after the last trained task (last row)."""
  r = _matrix(r)
  return float(r[-1].mean())


def backward_transfer(r: Any) -> float | None:
  """mean_{j < T-1} (R[T-1, j] - R[j, j]); ``None`` for one task."""
  r = _matrix(r)
  t = r.shape[0]
  if t < 2:
    return None
  return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def forward_transfer(r: Any, baseline: Any | None) -> float | None:
  """mean_{j >= 1} (R[j-1, j] - baseline[j]); ``None`` for one task or without a baseline."""
  r = _matrix(r)
  t = r.shape[0]
  if t < 2 or baseline is None:
    return None
  b = np.asarray(baseline, np.float64)
  if b.shape != (r.shape[1],):
    raise ValueError(f"baseline must hold one accuracy per task ({r.shape[1]}), got shape {b.shape}")
  return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(r: Any) -> float | None:
  """mean_{j < T-1} (max_{i < T-1} R[i, j] - R[T-1, j]); ``None`` for one task."""
  r = _matrix(r)
  t = r.shape[0]
  if t < 2:
    return None
  return float(np.mean([r[:t - 1, j].max() - r[t - 1, j] for j in range(t - 1)]))


def pooled_accuracy(correct: Sequence[int], total: Sequence[int]) -> float:
  """Correct answers over all examples of all tasks."""
  total_n = int(np.sum(total))
  if total_n <= 0:
    raise ValueError("pooled_accuracy: no evaluation examples")
  return float(np.sum(correct)) / total_n


def summarize(r: Any, *, baseline: Any | None = None, correct_last: Sequence[int] | None = None,
              total: Sequence[int] | None = None) -> dict[str, Any]:
  """Every metric of the module docstring for one run.

  Args:
    r: the accuracy matrix, rows = after each trained stage.
    baseline: accuracies of the model before training (for FWT).
    correct_last: correct answers per task after the last stage (for the pooled accuracy).
    total: evaluation examples per task.
  """
  r = _matrix(r)
  out = {
    "AA": average_accuracy(r),
    "BWT": backward_transfer(r),
    "FWT": forward_transfer(r, baseline),
    "forgetting": forgetting(r),
    "per_task_mean_accuracy": average_accuracy(r),
    "final_accuracy": [float(x) for x in r[-1]],
  }
  if correct_last is not None and total is not None:
    out["pooled_accuracy"] = pooled_accuracy(correct_last, total)
  else:
    out["pooled_accuracy"] = None
  return out


def summarize_partial(r: Sequence[Sequence[float | None]], baseline: Sequence[float | None] | None = None
                      ) -> dict[str, float | None]:
  """AA, BWT, FWT and forgetting of a matrix some of whose tasks have no value (``None``: e.g. rank
  classification of a task without label options): each metric is the mean of its terms over the tasks that have
  every value the term needs; ``None`` when no task does (or for one stage, as in ``summarize``)."""
  if not r:
    return {"AA": None, "BWT": None, "FWT": None, "forgetting": None}
  a = np.asarray([[np.nan if x is None else x for x in row] for row in r], np.float64)
  b = None if baseline is None else np.asarray([np.nan if x is None else x for x in baseline], np.float64)
  t = a.shape[0]

  def mean(terms: list[float]) -> float | None:
    terms = [x for x in terms if np.isfinite(x)]
    return float(np.mean(terms)) if terms else None

  return {
    "AA": mean(list(a[-1])),
    "BWT": mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]) if t > 1 else None,
    "FWT": mean([a[j - 1, j] - b[j] for j in range(1, t)]) if t > 1 and b is not None else None,
    "forgetting": mean([np.max(a[:t - 1, j]) - a[t - 1, j] for j in range(t - 1)]) if t > 1 else None,
  }


def option_set(labels: Sequence[str] | None) -> frozenset[str] | None:
  """The normalised label words of a task (``None`` for a free-form task)."""
  return None if labels is None else frozenset(normalize_answer(x) for x in labels)


def option_rate(predictions: Sequence[str], labels: Sequence[str] | None) -> float | None:
  """Share of ``predictions`` that equal one of ``labels`` after ``normalize_answer`` (the normalisation of exact
  match); ``None`` for a free-form task (no labels) or no predictions."""
  options = option_set(labels)
  if options is None or not predictions:
    return None
  return sum(normalize_answer(p) in options for p in predictions) / len(predictions)


# ---------------------------------------------------------------------------------------------------------------
# Invariant: protected directions of every constrained matrix are untouched by a task's updates.
# ---------------------------------------------------------------------------------------------------------------


@jax.jit
def _ratios(before: jax.Array, after: jax.Array, s: Subspace) -> dict[str, jax.Array]:
  after = after.astype(jnp.float32)
  dw = after - before.astype(jnp.float32)
  s = s._replace(left=s.left.astype(jnp.float32), right=s.right.astype(jnp.float32))
  fro = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))
  norm = fro(dw)
  # ||U^T dW|| = ||U U^T dW|| (orthonormal U); same on the right side.
  left = fro(subspace_lib.protected_left(s, dw))
  right = fro(subspace_lib.protected_right(s, dw))
  block = fro(subspace_lib.protected_right(s, subspace_lib.protected_left(s, dw)))
  safe = jnp.where(norm > 0, norm, 1.0)
  ratio = lambda x: jnp.where(norm > 0, x / safe, 0.0)
  return {"left": ratio(left), "right": ratio(right), "block": ratio(block), "dw": norm, "w": fro(after)}


# Unit roundoff of float32: every parameter update W + u is rounded, which alone moves W by up to this much
# (relative) in every direction, protected ones included.
F32_ROUNDOFF = 2.0**-24
# A matrix counts as moved when its change is at least this many times the rounding noise of its updates;
# below that, ||U^T dW|| / ||dW|| compares rounding noise with rounding noise and says nothing about the update.
MOVED_FACTOR = 1e3


def invariant_ratios(before: Mapping[str, Any], after: Mapping[str, Any], subspaces: Mapping[str, Any],
                     steps: int = 1) -> dict[str, dict[str, float]]:
  """``||U^T dW||``, ``||dW V||`` and ``||U^T dW V||`` over ``||dW||`` per constrained matrix (max over layers).

  Float32 weights are rounded at every update, so even an exactly projected update leaves
  ``~sqrt(steps) * 2^-24 * ||W||`` in the protected directions. Layers whose ``||dW||`` is not at least
  ``MOVED_FACTOR`` times that floor did not move (e.g. every free direction of their input is unused) and are
  left out of the ratios (counted in ``static_layers``).

  Args:
    before: ``{path: W}`` at the start of the task.
    after: ``{path: W}`` at its end.
    subspaces: ``{path: Subspace}`` in force during the task (paths without one are skipped).
    steps: optimizer steps of the task (for the rounding floor).

  Returns:
    ``{path: {"left", "right", "block", "floor", "static_layers"}}``: the ratios (max over moved layers), the
    largest rounding floor ``sqrt(steps) 2^-24 ||W|| / ||dW||`` among them, and the number of static layers.
  """
  out = {}
  for path, s in subspaces.items():
    if not isinstance(s, Subspace) or path not in before:
      continue
    # to_host: with weights sharded over several processes the per-layer ratios may be too.
    r = {k: np.asarray(v, np.float64).reshape(-1) for k, v in
         distributed.to_host(_ratios(jnp.asarray(before[path]), jnp.asarray(after[path]), s)).items()}
    noise = np.sqrt(max(steps, 1)) * F32_ROUNDOFF * r["w"]
    moved = r["dw"] > MOVED_FACTOR * noise
    floor = np.where(moved, noise / np.where(r["dw"] > 0, r["dw"], 1.0), 0.0)
    entry = {k: float(np.max(r[k][moved])) if moved.any() else 0.0 for k in ("left", "right", "block")}
    out[path] = entry | {"floor": float(floor.max()) if moved.any() else 0.0, "static_layers": int((~moved).sum())}
  return out


# The ratios each projection variant keeps at zero (docs/design.md §2).
INVARIANT_KEYS = {"both": ("left", "right"), "left": ("left",), "right": ("right",), "block": ("block",)}


def invariant_max(ratios_per_task: Sequence[Mapping[str, Mapping[str, float]]], sides: str = "both") -> float:
  """The largest ratio the variant ``sides`` guarantees, over tasks and matrices (0 when nothing is constrained)."""
  keys = INVARIANT_KEYS[sides]
  values = [r[k] for task in ratios_per_task for r in task.values() for k in keys]
  return float(max(values)) if values else 0.0
