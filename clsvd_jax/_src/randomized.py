"""Task-boundary accumulation for large matrices: randomized subspace iteration and QR assembly, no d x d solve.

``compute_subspaces(..., solver="randomized")`` lands here. It returns what the exact path
(``subspace.accumulate``) returns: the same stored form (protected or allowed columns, zero padded, same flags and
ranks), the previous subspace kept exactly, the new directions taken from the complement part ``R = P(W)``
(weights source) or from the projected input / output covariances (activations source). What changes is the work:

* The exact path forms d x d projectors, takes a full SVD of R, and finds each side's stored basis with an
  eigendecomposition of a d x d matrix. For LLaMA-2-7B's MLP matrices (11008 x 4096) that eigh of an
  11008 x 11008 matrix costs ~20x the eigh of the 4096 side and dominates the boundary.
* Here R is applied through the stored bases (thin products, O(m n c)); the top ``count`` new directions come from
  randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithms 4.4 / 5.1): a Gaussian test matrix of
  ``width = count + oversample`` columns, ``power_iters`` rounds of ``R R^T`` each re-orthonormalised by QR, then an
  SVD of the small ``width x n`` matrix ``Q^T R``. Direction i converges like ``(s_{width+1} / s_i)^(2q+1)``: exact
  to rounding where the spectrum decays or has a gap at the cut, approximate inside a flat bulk of nearly equal
  singular values (where any rotation among them protects the same energy; ``benchmarks/boundary.py`` measures
  both the principal angles and the captured energy). When ``width`` reaches half of ``min(m, n)`` the
  randomized range finder saves nothing and a thin SVD of R (or eigh of the n x n covariance) is used instead.
* Each side's stored basis is assembled from thin QR factorisations: protected columns appended after the old ones;
  an allowed (complement) basis shrunk by the new directions through a complete QR of their c x width coordinates;
  only a side that switches from protected to allowed columns at this boundary needs a d x d factor (a complete QR
  of its k protected columns), computed only when some matrix of the stack switches.

Ranks are data, shapes static: ``width`` and which assembly cases occur are read from the concrete ranks on the
host and are static arguments, so a run compiles one program per (width, cases) and reuses it. Stacks go through
``linalg.map_matrices`` (QR and SVD are LAPACK decompositions on CPU).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax._src import linalg
from clsvd_jax._src.subspace import Subspace

_HIGHEST = jax.lax.Precision.HIGHEST

# Assembly cases of one side: old stored form -> new stored form.
_PROTECT, _ALLOW, _SWITCH = 0, 1, 2


class Plan(NamedTuple):
  """Static choices of one call (from the concrete ranks): search width, exact fallback, assembly cases per side."""

  width: int
  power_iters: int
  exact: bool
  left_cases: tuple[int, ...]
  right_cases: tuple[int, ...]
  seed: int


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _qr(x: jax.Array) -> jax.Array:
  return jnp.linalg.qr(x, mode="reduced")[0]


# ---------------------------------------------------------------------------------------------------------------
# Applying a stored side (the same algebra as subspace._left_span / _select, on vectors of one matrix).
# ---------------------------------------------------------------------------------------------------------------


def _complement(basis: jax.Array, allow: jax.Array, x: jax.Array) -> jax.Array:
  """``(I - P) x`` for the protected projector P of one stored side ([d, c] basis) and x [d, j]."""
  span = _mm(basis, _mm(basis.T, x))
  return jnp.where(allow, span, x - span)


def _orthonormal_complement(basis: jax.Array, allow: jax.Array, x: jax.Array, count: jax.Array) -> jax.Array:
  """The first ``count`` columns of x made orthonormal inside the complement of the side; other columns zero.

  Project, QR, twice ("twice is enough"): a column that falls (numerically) into the old span comes back from the
  first QR as an arbitrary unit vector, which the second round moves into the complement.
  """
  keep = jnp.arange(x.shape[-1]) < count
  for _ in range(2):
    x = _qr(_complement(basis, allow, x * keep)) * keep
  return x


# ---------------------------------------------------------------------------------------------------------------
# New directions
# ---------------------------------------------------------------------------------------------------------------


def _range_svd(r: jax.Array, plan: Plan, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top ``plan.width`` singular triplets ``(a [m, w], s [w], b [n, w])`` of r, descending."""
  if plan.exact:
    a, s, bt = jnp.linalg.svd(r, full_matrices=False)
    return a[:, :plan.width], s[:plan.width], bt[:plan.width].T
  q = _qr(_mm(r, jax.random.normal(key, (r.shape[1], plan.width), r.dtype)))
  for _ in range(plan.power_iters):
    q = _qr(_mm(r, _qr(_mm(r.T, q))))
  ub, s, vbt = jnp.linalg.svd(_mm(q.T, r), full_matrices=False)
  return _mm(q, ub), s, vbt.T


def _psd_top(op: Any, dense: Any, dim: int, plan: Plan, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top ``plan.width`` eigenpairs ``(vectors [dim, w], values [w])`` of a PSD operator, descending.

  ``op`` maps [dim, j] -> [dim, j]; ``dense()`` builds the matrix for the exact fallback.
  """
  if plan.exact:
    evals, vecs = jnp.linalg.eigh(dense())
    return vecs[:, ::-1][:, :plan.width], evals[::-1][:plan.width]
  q = _qr(op(jax.random.normal(key, (dim, plan.width), jnp.float32)))
  # One application of a PSD operator gains one power of the eigenvalue ratio, one round of R R^T two: 2q rounds
  # give the same (l_{w+1} / l_i)^(2q+1) as ``_range_svd`` at the same number of products.
  for _ in range(2 * plan.power_iters):
    q = _qr(op(q))
  t = _mm(q.T, op(q))
  evals, vecs = jnp.linalg.eigh(0.5 * (t + t.T))
  return _mm(q, vecs[:, ::-1]), evals[::-1]


# ---------------------------------------------------------------------------------------------------------------
# Assembling one side's stored basis
# ---------------------------------------------------------------------------------------------------------------


def _place(x: jax.Array, start: jax.Array, width: int) -> jax.Array:
  """x [d, j] (valid columns first) shifted to start at column ``start`` of a [d, width] block."""
  d, j = x.shape
  x = x[:, :width] if j >= width else jnp.concatenate([x, jnp.zeros((d, width - j), x.dtype)], axis=1)
  return jnp.roll(x, start, axis=1)


def _grow_protect(old: jax.Array, k_old: jax.Array, new: jax.Array, k: jax.Array) -> jax.Array:
  """Protected columns stay protected: the new directions go after the old ones."""
  cols = jnp.arange(old.shape[1])
  return old * (cols < k_old) + _place(new, k_old, old.shape[1]) * (cols < k)


def _shrink_allow(old: jax.Array, k_old: jax.Array, new: jax.Array, count: jax.Array, k: jax.Array) -> jax.Array:
  """An allowed (complement) basis loses the new directions.

  z = old^T new holds the new directions' coordinates in the old complement basis (orthonormal columns, zero past
  ``count`` and on the rows of unused columns). The columns ``count..`` of z's complete QR factor span the rest of
  that coordinate space; Householder reflectors of columns that are zero below the used rows leave those rows
  alone, so the first ``d - k`` of them are the coordinates of the new complement.
  """
  c = old.shape[1]
  d = old.shape[0]
  z = _mm(old.T, new)
  q = jnp.linalg.qr(z, mode="complete")[0]
  coords = jnp.roll(q, -count, axis=1)
  return _mm(old * (jnp.arange(c) < d - k_old), coords) * (jnp.arange(c) < d - k)


def _switch_to_allow(old: jax.Array, k_old: jax.Array, new: jax.Array, k: jax.Array) -> jax.Array:
  """Protected columns become too many to store: the complement of all k of them, from a complete QR."""
  d, c = old.shape
  width = c + new.shape[1]
  protected = jnp.concatenate([old * (jnp.arange(c) < k_old), jnp.zeros((d, new.shape[1]), old.dtype)], axis=1)
  protected = protected + _place(new, k_old, width) * (jnp.arange(width) < k)
  q = jnp.linalg.qr(protected, mode="complete")[0]
  return jnp.roll(q, -k, axis=1)[:, :c] * (jnp.arange(c) < d - k)


def _grow_side(old: jax.Array, old_allow: jax.Array, k_old: jax.Array, new: jax.Array, k: jax.Array,
               cases: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The stored basis and allow flag of one side at rank k (``cases``: the assembly cases this stack needs)."""
  d, c = old.shape
  if c == 0:
    return old, k > c
  count = k - k_old
  new_allow = k > c
  case = jnp.where(old_allow, _ALLOW, jnp.where(new_allow, _SWITCH, _PROTECT))
  fns = {_PROTECT: lambda: _grow_protect(old, k_old, new, k),
         _ALLOW: lambda: _shrink_allow(old, k_old, new, count, k),
         _SWITCH: lambda: _switch_to_allow(old, k_old, new, k)}
  branches = [fns[i] for i in cases]
  index = sum(jnp.where(case == i, pos, 0) for pos, i in enumerate(cases))
  # One matrix at a time on CPU (lax.map): only its own case runs. Batched (vmap) on accelerators: every listed
  # case runs and the right one is selected, hence the static list.
  basis = branches[0]() if len(branches) == 1 else jax.lax.switch(index, branches)
  return basis.astype(old.dtype), new_allow


# ---------------------------------------------------------------------------------------------------------------
# One matrix, the stack, the host-side plan
# ---------------------------------------------------------------------------------------------------------------


def _accumulate_one(w: jax.Array, k: jax.Array, prev: Subspace, plan: Plan,
                    cov: jax.Array | None) -> tuple[Subspace, jax.Array]:
  w = w.astype(jnp.float32)
  left, right = prev.left.astype(jnp.float32), prev.right.astype(jnp.float32)
  count = k - prev.rank
  key_l, key_r = jax.random.split(jax.random.PRNGKey(plan.seed))
  comp_l = lambda x: _complement(left, prev.left_allow, x)
  comp_r = lambda x: _complement(right, prev.right_allow, x)
  if cov is None:
    r = comp_r(comp_l(w).T).T  # (I - P_u) W (I - P_v)
    a, spectrum, b = _range_svd(r, plan, key_l)
  else:
    cov = cov.astype(jnp.float32)
    cc = comp_r(comp_r(0.5 * (cov + cov.T)).T)
    b, evals_r = _psd_top(lambda x: _mm(cc, x), lambda: cc, w.shape[1], plan, key_r)
    if plan.exact:
      # The output covariance (I - P_u) W C W^T (I - P_u) is F F^T with F = (I - P_u) W C^(1/2): its top
      # eigenvectors are F's left singular vectors, found without the m x m eigh (m = 11008 for LLaMA's MLP).
      evals, vecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
      a, _, _ = _range_svd(comp_l(_mm(w, vecs * jnp.sqrt(jnp.maximum(evals, 0.0)))), plan, key_l)
    else:
      out_op = lambda x: comp_l(_mm(w, _mm(cov, _mm(w.T, comp_l(x)))))
      a, _ = _psd_top(out_op, None, w.shape[0], plan, key_l)
    spectrum = jnp.sqrt(jnp.maximum(evals_r, 0.0))
  a = _orthonormal_complement(left, prev.left_allow, a, count)
  b = _orthonormal_complement(right, prev.right_allow, b, count)
  new_left, left_allow = _grow_side(left, prev.left_allow, prev.rank, a, k, plan.left_cases)
  new_right, right_allow = _grow_side(right, prev.right_allow, prev.rank, b, k, plan.right_cases)
  return Subspace(new_left, new_right, left_allow, right_allow, k.astype(jnp.int32)), spectrum


@functools.partial(jax.jit, static_argnames=("plan", "dtype", "spectrum_size"))
def _accumulate_stack(w: jax.Array, k: jax.Array, prev: Subspace, cov: jax.Array | None, plan: Plan, dtype: Any,
                      spectrum_size: int) -> tuple[Subspace, jax.Array]:
  batch = w.shape[:-2]
  flat = lambda x, tail: x.reshape((-1,) + x.shape[len(batch):]) if tail else x.reshape(-1)
  pf = Subspace(flat(prev.left, True), flat(prev.right, True), flat(prev.left_allow, False),
                flat(prev.right_allow, False), flat(prev.rank, False))
  if cov is None:
    sub, spectrum = linalg.map_matrices(lambda a, b, c: _accumulate_one(a, b, c, plan, None), flat(w, True),
                                        flat(k, False), pf)
  else:
    sub, spectrum = linalg.map_matrices(lambda a, b, c, d: _accumulate_one(a, b, c, plan, d), flat(w, True),
                                        flat(k, False), pf, flat(cov, True))
  # The exact path returns the whole spectrum; past the width it was never computed: zeros.
  spectrum = jnp.pad(spectrum[:, :spectrum_size], ((0, 0), (0, max(spectrum_size - spectrum.shape[1], 0))))
  unflat = lambda x: x.reshape(batch + x.shape[1:])
  sub = Subspace(unflat(sub.left).astype(dtype), unflat(sub.right).astype(dtype), unflat(sub.left_allow),
                 unflat(sub.right_allow), unflat(sub.rank))
  return sub, unflat(spectrum)


def _cases(k_old: np.ndarray, old_allow: np.ndarray, k: np.ndarray, capacity: int) -> tuple[int, ...]:
  case = np.where(old_allow, _ALLOW, np.where(k > capacity, _SWITCH, _PROTECT))
  return tuple(sorted({int(c) for c in np.ravel(case)}))


def plan_for(shape: tuple[int, ...], k: Any, prev: Subspace, *, oversample: int | None = None,
             power_iters: int = 4, seed: int = 0) -> Plan:
  """The static plan of one call from the concrete ranks (see the module docstring).

  Args:
    shape: the weight's shape ``[..., m, n]``.
    k: new ranks (concrete), broadcastable to the batch shape.
    prev: the previous subspace (its ranks and flags are read on the host).
    oversample: extra search columns; default ``max(8, count // 4)``; the width is rounded up to a multiple of 8
      (fewer distinct compiled programs across boundaries).
    power_iters: subspace-iteration rounds.
    seed: seed of the Gaussian test matrix.
  """
  m, n = shape[-2:]
  k = np.broadcast_to(np.asarray(k), shape[:-2])
  k_old = np.asarray(prev.rank)
  count = int(np.max(k - k_old, initial=0))
  extra = max(8, count // 4) if oversample is None else int(oversample)
  width = min(min(m, n), -(-(count + extra) // 8) * 8)
  exact = 2 * width >= min(m, n)
  if exact:
    width = min(m, n)
  c_left, c_right = prev.capacity
  return Plan(width=width, power_iters=int(power_iters), exact=bool(exact),
              left_cases=_cases(k_old, np.asarray(prev.left_allow), k, c_left),
              right_cases=_cases(k_old, np.asarray(prev.right_allow), k, c_right), seed=int(seed))


def accumulate(w: jax.Array, k: Any, prev: Subspace, dtype: Any = jnp.float32, cov: jax.Array | None = None, *,
               oversample: int | None = None, power_iters: int = 4, seed: int = 0) -> tuple[Subspace, jax.Array]:
  """Grows ``prev`` to ranks ``k`` for a matrix or stack ``w`` ([..., m, n]); the randomized ``_accumulate``.

  Args:
    w: the weights.
    k: concrete new ranks (numpy / ints) of the batch shape, ``>= prev.rank`` and representable in the capacity.
    prev: the previous subspace (capacity fixed; ``empty_subspace`` for the first task).
    dtype: dtype of the stored bases.
    cov: input covariances ``[..., n, n]`` (activations basis source), or None (weights).
    oversample, power_iters, seed: see ``plan_for``.

  Returns:
    ``(subspace, spectrum)``: spectrum as the exact path's (singular values of R, or square roots of the projected
    covariance's eigenvalues), descending, zero past the computed width.
  """
  plan = plan_for(tuple(np.shape(w)), k, prev, oversample=oversample, power_iters=power_iters, seed=seed)
  m, n = np.shape(w)[-2:]
  k_arr = jnp.asarray(np.broadcast_to(np.asarray(k), np.shape(w)[:-2]), jnp.int32)
  return _accumulate_stack(jnp.asarray(w), k_arr, prev, None if cov is None else jnp.asarray(cov), plan, dtype,
                           min(m, n) if cov is None else n)
