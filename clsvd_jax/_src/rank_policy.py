"""Rank policies: how many directions each matrix protects before a task (docs/design.md §4).

Every policy returns ``{path: int32 array of the matrix's batch shape}`` and guarantees, per matrix,
``previous <= k <= min(m, n) - min_trainable`` (clipped at 0 below), so protected subspaces only grow and some
directions always stay trainable. Ranks are data: they are fed to ``compute_subspaces`` and never change shapes.

Beside the policies, the NumPy pieces the task scheduler (``clsvd_jax.train.scheduler``) combines them with: block
importance from cosines and per matrix, incremental growth, the energy extension of a protected subspace, and the
largest rank a subspace's capacity can store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Shape = tuple[int, ...]


def finish_ranks(path: str, k: np.ndarray, shape: Shape, previous: Mapping[str, Any] | None,
                 min_trainable: int) -> np.ndarray:
  """Raw ranks ``k`` of one matrix made valid: clipped to ``[0, min(m, n) - min_trainable]``, never below previous.

  Args:
    path: the parameter's path (for errors).
    k: ranks, broadcastable to the matrix's batch shape.
    shape: the matrix's shape ``[..., m, n]``.
    previous: ``{path: ranks}`` before this task, or None.
    min_trainable: directions that always stay free.

  Returns:
    int32 ranks of the batch shape.
  """
  if len(shape) < 2:
    raise ValueError(f"parameter {path!r} has shape {tuple(shape)}: ranks are only defined for matrices")
  if min_trainable < 0:
    raise ValueError(f"min_trainable must be >= 0, got {min_trainable}")
  *batch, m, n = shape
  cap = max(min(m, n) - min_trainable, 0)
  k = np.broadcast_to(np.asarray(k), tuple(batch))
  k = np.clip(k, 0, cap)
  if previous is not None and previous.get(path) is not None:
    prev = np.broadcast_to(np.asarray(previous[path]), tuple(batch))
    # Monotone growth wins over min_trainable: a subspace is never un-protected.
    k = np.maximum(k, prev)
  return k.astype(np.int32)




def normalize_importance(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Min-max normalises block importances jointly across all stacks to [0, 1] (constant input -> all 0.5).

  Raises:
    ValueError: naming the entries, when an importance is NaN or infinite (one would silently turn every
      normalised value into NaN and every rank into 0: all protection gone).
  """
  values = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in raw.values()]) if raw else np.zeros(0)
  if values.size == 0:
    return {}
  bad = sorted(key for key, v in raw.items() if not np.isfinite(np.asarray(v, np.float64)).all())
  if bad:
    raise ValueError(f"block importance is NaN or infinite for {bad[:5]}: the calibration pass produced "
                     "non-finite hidden states (check the model's outputs on the calibration batches)")
  lo, hi = float(values.min()), float(values.max())
  span = hi - lo
  out = {}
  for key, v in raw.items():
    v = np.asarray(v, np.float64)
    out[key] = np.full_like(v, 0.5) if span <= 1e-12 else (v - lo) / span
  return out


def retention_ratio(importance: Any, *, mrr: float = 0.1, trr: float = 0.8) -> np.ndarray:
  """The paper's retention ratio r = mrr + I (trr - mrr) for normalised importance I in [0, 1]."""
  if not 0.0 <= mrr <= trr <= 1.0:
    raise ValueError(f"need 0 <= mrr <= trr <= 1, got mrr={mrr}, trr={trr}")
  imp = np.clip(np.asarray(importance, np.float64), 0.0, 1.0)
  return mrr + imp * (trr - mrr)


def importance_from_cosines(cosines: Mapping[str, Any], direction: str = "1-cos") -> dict[str, np.ndarray]:
  """Raw importance per block: ``1 - cos`` (blocks that change the residual stream most matter most) or ``cos``."""
  if direction not in ("1-cos", "cos"):
    raise ValueError(f"importance direction must be '1-cos' or 'cos', got {direction!r}")
  return {k: (1.0 - np.asarray(v, np.float64)) if direction == "1-cos" else np.asarray(v, np.float64)
          for k, v in cosines.items()}


def stack_of(path: str, stacks: Iterable[str]) -> str | None:
  """The stack prefix (``layers``, ``encoder/layers``, ...) a parameter path belongs to (longest match)."""
  best = None
  for s in stacks:
    if (path == s or path.startswith(s + "/")) and (best is None or len(s) > len(best)):
      best = s
  return best


def importance_by_matrix(normalized: Mapping[str, np.ndarray], shapes: Mapping[str, Shape]) -> dict[str, np.ndarray]:
  """Each matrix takes its block's normalised importance: ``[L]`` for a stack, the mean for a lone matrix.

  Raises:
    ValueError: naming the matrix, when no stack covers it or the layer counts differ.
  """
  out = {}
  for path, shape in shapes.items():
    stack = stack_of(path, normalized)
    if stack is None:
      raise ValueError(f"no block importance covers {path!r}; measured stacks: {sorted(normalized)}")
    imp = np.asarray(normalized[stack], np.float64)
    batch = tuple(shape[:-2])
    if batch == imp.shape:
      out[path] = imp
    elif not batch:
      out[path] = np.asarray(imp.mean())
    else:
      raise ValueError(f"{path!r} has {batch} stacked matrices but its stack {stack!r} has {imp.shape} blocks")
  return out


def importance_ranks(importance: Mapping[str, Any], shapes: Mapping[str, Shape], *, mrr: float = 0.1,
                     trr: float = 0.8, previous: Mapping[str, Any] | None = None,
                     min_trainable: int = 1) -> dict[str, np.ndarray]:
  """The paper's adaptive policy: k = floor(r * min(m, n)) with r from the block's importance.

  Args:
    importance: ``{path: normalised importance}`` per matrix, a scalar or an array of the matrix's batch shape
      (the stack of layers: each stacked matrix takes its own block's importance).
    shapes: ``{path: shape}`` of the constrained matrices.
    mrr: minimum retention ratio (least important block).
    trr: top retention ratio (most important block).
    previous: ranks before this task (monotone growth).
    min_trainable: directions that always stay free.
  """
  out = {}
  for path, shape in shapes.items():
    if path not in importance:
      raise ValueError(f"no importance for {path!r}; importance covers {sorted(importance)[:5]}")
    r = retention_ratio(importance[path], mrr=mrr, trr=trr)
    k = np.floor(r * min(shape[-2:]) + 1e-9).astype(np.int64)
    out[path] = finish_ranks(path, k, shape, previous, min_trainable)
  return out


def schedule_ranks(task_index: int, shapes: Mapping[str, Shape], *, rate: float = 0.07, max_ratio: float = 0.95,
                   previous: Mapping[str, Any] | None = None, min_trainable: int = 1) -> dict[str, np.ndarray]:
  """Ratio that grows with the task index: k = floor(min(rate * task_index, max_ratio) * min(m, n)).

  ``task_index`` counts finished tasks (0 before the first task), as in the official code's ``0.07 t``.
  """
  if task_index < 0:
    raise ValueError(f"task_index must be >= 0, got {task_index}")
  ratio = min(rate * task_index, max_ratio)
  out = {}
  for path, shape in shapes.items():
    k = int(np.floor(ratio * min(shape[-2:]) + 1e-9))
    out[path] = finish_ranks(path, np.asarray(k), shape, previous, min_trainable)
  return out


def energy_rank(singular_values: Any, eps: float) -> np.ndarray:
  """Smallest k whose top-k singular values keep a fraction ``eps`` of the squared spectrum (per matrix).

  Args:
    singular_values: ``[..., r]`` singular values sorted descending.
    eps: fraction in [0, 1].
  """
  if not 0.0 <= eps <= 1.0:
    raise ValueError(f"eps must lie in [0, 1], got {eps}")
  s2 = np.square(np.asarray(singular_values, np.float64))
  total = s2.sum(-1, keepdims=True)
  frac = np.cumsum(s2, -1) / np.where(total > 0, total, 1.0)
  # Count the prefixes that still fall short of eps; the next one reaches it.
  k = (frac < eps - 1e-12).sum(-1) + (eps > 0)
  return np.where(total[..., 0] > 0, np.minimum(k, s2.shape[-1]), 0)


def energy_ranks(singular_values: Mapping[str, Any], eps: float, *, shapes: Mapping[str, Shape] | None = None,
                 previous: Mapping[str, Any] | None = None, min_trainable: int = 1) -> dict[str, np.ndarray]:
  """GPM-style policy: per matrix the smallest k keeping a fraction ``eps`` of the squared spectrum.

  Args:
    singular_values: ``{path: [..., r] singular values}`` (e.g. of W, or of the complement part R with
      ``previous`` ranks added on top by the caller).
    eps: energy fraction.
    shapes: ``{path: shape}``; default inferred as square ``r x r`` (pass the real shapes for min_trainable).
    previous: ranks before this task (monotone growth).
    min_trainable: directions that always stay free.
  """
  out = {}
  for path, s in singular_values.items():
    s = np.asarray(s)
    shape = tuple(shapes[path]) if shapes is not None else tuple(s.shape) + (s.shape[-1],)
    out[path] = finish_ranks(path, energy_rank(s, eps), shape, previous, min_trainable)
  return out


def incremental_importance_ranks(importance: Mapping[str, Any], shapes: Mapping[str, Shape], *, mrr: float,
                                 trr: float, previous: Mapping[str, Any] | None,
                                 min_trainable: int) -> dict[str, np.ndarray]:
  """Each task protects a fraction r (the paper's retention ratio) of the directions still free."""
  out = {}
  for path, shape in shapes.items():
    r = retention_ratio(importance[path], mrr=mrr, trr=trr)
    prev = np.zeros(shape[:-2], np.int64) if previous is None or path not in previous else np.asarray(previous[path])
    free = min(shape[-2:]) - prev
    k = prev + np.floor(r * free + 1e-9).astype(np.int64)
    out[path] = finish_ranks(path, k, shape, previous, min_trainable)
  return out


def energy_extension(protected_energy: np.ndarray, spectrum: np.ndarray, total: np.ndarray,
                     eps: float) -> np.ndarray:
  """New directions needed so protected + top-j of the complement spectrum keep ``eps`` of the total energy.

  Args:
    protected_energy: ``[...]`` energy already inside the protected subspace.
    spectrum: ``[..., r]`` complement spectrum (singular values), descending.
    total: ``[...]`` total energy.
    eps: target fraction.
  """
  s2 = np.square(np.asarray(spectrum, np.float64))
  need = eps * np.asarray(total, np.float64) - np.asarray(protected_energy, np.float64)
  cum = np.cumsum(s2, -1)
  # j = number of complement directions until the cumulative energy reaches the need (0 if already met).
  j = (cum < need[..., None] - 1e-12 * np.maximum(total[..., None], 1.0)).sum(-1) + 1
  j = np.where(need <= 0, 0, np.minimum(j, s2.shape[-1]))
  return j.astype(np.int64)


def capacity_rank(shape: Shape, capacity: tuple[int, int] | None) -> int:
  """The largest rank both sides of a subspace of this ``(left, right)`` capacity can represent (up to min(m, n)).

  A side stores the k protected or the d - k allowed columns (docs/design.md §5), so rank k fits a side of
  capacity c when ``k <= c`` or ``d - k <= c``; None: no subspace yet, every rank fits.
  """
  m, n = shape[-2:]
  if capacity is None:
    return min(m, n)
  c_left, c_right = capacity
  best = 0
  for k in range(min(m, n) + 1):
    if (k <= c_left or m - k <= c_left) and (k <= c_right or n - k <= c_right):
      best = k
    else:
      break
  return best
