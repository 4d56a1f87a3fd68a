"""The randomized boundary solver (``compute_subspaces(..., solver="randomized")``) against the exact one.

Spectra have gaps at the cuts the tests use, so "the top-k subspace" is well defined in float32 and both solvers
must find it; every stored form (protected columns, allowed columns, the switch between them) is crossed.
"""

import jax
import numpy as np
import pytest

import clsvd_jax as cj
from clsvd_jax._src import randomized

M, N = 96, 64  # default capacity (48, 32)
CUTS = (8, 24, 40, 56)


def _gapped_spectrum(size, cuts):
  """Slowly decreasing plateaus that drop 3x after each cut: the top-k subspace is sharp at every cut."""
  s = 1.0 - 0.002 * np.arange(size)
  for c in cuts:
    s[c:] *= 0.3
  return s


def _orthogonal(rng, d):
  return np.linalg.qr(rng.standard_normal((d, d)))[0]


def _matrix(seed, m=M, n=N, cuts=CUTS):
  """A matrix with the gapped spectrum, and one with the same singular vectors and unit singular values."""
  rng = np.random.default_rng(seed)
  u, v = _orthogonal(rng, m)[:, :min(m, n)], _orthogonal(rng, n)[:, :min(m, n)]
  return ((u * _gapped_spectrum(min(m, n), cuts)) @ v.T).astype(np.float32), (u @ v.T).astype(np.float32), v


def _largest_angle(a, b):
  """sin of the largest principal angle between the column spans of a and b (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(b - a @ (a.T @ b), 2)) if a.shape[-1] else 0.0


_protected_basis = jax.jit(cj.protected_basis, static_argnums=1)


def _span(sub, side, k):
  return np.asarray(_protected_basis(sub, side))[..., :k]


def _check_stored(sub, k):
  """Stored columns orthonormal, zero past the used ones; the flag says which form a side stores."""
  for side, dim in (("left", sub.left.shape[-2]), ("right", sub.right.shape[-2])):
    basis = np.asarray(getattr(sub, side), np.float64)
    allow = bool(np.asarray(getattr(sub, side + "_allow")))
    used = dim - k if allow else k
    assert allow == (k > basis.shape[-1])
    np.testing.assert_allclose(basis[:, :used].T @ basis[:, :used], np.eye(used), atol=2e-6)
    assert np.all(basis[:, used:] == 0)


def _grow_both(w, ranks, covariance=None):
  """Runs both solvers through ``ranks`` (accumulating); yields (k, exact, randomized, previous randomized)."""
  prev_e = prev_r = None
  cov = None if covariance is None else {"w": covariance}
  for k in ranks:
    exact = cj.compute_subspaces({"w": w}, {"w": k}, previous=prev_e, covariances=cov)
    fast = cj.compute_subspaces({"w": w}, {"w": k}, previous=prev_r, covariances=cov, solver="randomized")
    yield k, exact["w"], fast["w"], None if prev_r is None else prev_r["w"]
    prev_e, prev_r = exact, fast


@pytest.mark.parametrize("source", ["weights", "activations"])
def test_randomized_equals_exact_through_every_storage_form(source):
  w, flat_w, v = _matrix(0)
  cov = None
  ranks = [24, 40, 56]  # protected columns; the right side switches to allowed columns; the left switches too
  if source == "activations":
    # The gaps in the input covariance, whose eigenvectors are W's right singular vectors, and W with unit singular
    # values: the output covariance W C W^T has the same gaps (a gapped W too would cube the spectrum past what
    # float32 resolves at the last cut).
    w, cov, ranks = flat_w, ((v * _gapped_spectrum(N, CUTS)) @ v.T).astype(np.float32), ranks[:2]
  previous_rank = 0
  for k, exact, fast, prev in _grow_both(w, ranks, cov):
    plan = randomized.plan_for(w.shape, k, cj.empty_subspace(w.shape) if prev is None else prev)
    # 24 new directions of 64 take the exact fallback (thin SVD / eigh, then the same QR assembly); 16 the search.
    assert plan.exact == (k == 24)
    assert int(fast.rank) == k
    _check_stored(fast, k)
    for side in ("left", "right"):
      assert bool(getattr(fast, side + "_allow")) == bool(getattr(exact, side + "_allow"))
      assert _largest_angle(_span(exact, side, k), _span(fast, side, k)) < 1e-4, (k, side)
      if prev is not None:  # the previous subspace is kept exactly
        assert _largest_angle(_span(fast, side, k), _span(prev, side, previous_rank)) < 1e-5
    previous_rank = k


def test_stack_mixes_storage_cases_per_layer():
  ws = np.stack([_matrix(seed)[0] for seed in range(3)])
  prev_e = prev_r = None
  # Second boundary: layer 0 switches its right side to allowed columns, layer 1 gains nothing, layer 2 stays in
  # protected columns; one program serves all three.
  for ks in (np.array([24, 24, 8]), np.array([40, 24, 24])):
    if prev_r is not None:
      plan = randomized.plan_for(ws.shape, ks, prev_r["w"])
      assert not plan.exact and plan.right_cases == (0, 2) and plan.left_cases == (0,)
    exact = cj.compute_subspaces({"w": ws}, {"w": ks}, previous=prev_e)
    fast = cj.compute_subspaces({"w": ws}, {"w": ks}, previous=prev_r, solver="randomized")
    for layer, k in enumerate(ks):
      _check_stored(cj.Subspace(*(x[layer] for x in fast["w"])), int(k))
      for side in ("left", "right"):
        assert _largest_angle(_span(exact["w"], side, k)[layer], _span(fast["w"], side, k)[layer]) < 1e-4
    prev_e, prev_r = exact, fast


def test_randomized_subspace_keeps_the_invariant_and_ranks_are_data():
  w = _matrix(1)[0]
  sub = cj.compute_subspaces({"w": w}, {"w": 8}, solver="randomized")["w"]
  g = np.random.default_rng(2).standard_normal((M, N)).astype(np.float32)
  dw = np.asarray(cj.project(g, sub), np.float64)
  u, vv = _span(sub, "left", 8), _span(sub, "right", 8)
  assert np.linalg.norm(u.T @ dw) / np.linalg.norm(dw) < 1e-6
  assert np.linalg.norm(dw @ vv) / np.linalg.norm(dw) < 1e-6
  # Same plan (width, cases), other ranks: no new program.
  size = randomized._accumulate_stack._cache_size()
  cj.compute_subspaces({"w": w}, {"w": 6}, solver="randomized")
  assert randomized._accumulate_stack._cache_size() == size


def test_unknown_solver_is_refused():
  with pytest.raises(ValueError, match="solver"):
    cj.compute_subspaces({"w": np.ones((4, 4), np.float32)}, {"w": 1}, solver="fast")
