"""compute_subspaces: SVD bases, accumulation between tasks (docs/design.md §3), bad input, property tests."""

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj


def _span_distance(a, b):
  """||P_a - P_b||_2 for orthonormal bases a, b (0 iff same span; sin of the largest principal angle)."""
  pa = a @ a.T
  pb = b @ b.T
  return float(np.linalg.norm(pa - pb, 2)) if a.shape[1] or b.shape[1] else 0.0


def _contains(big, small):
  """Largest sine of the principal angles between span(small) and its projection on span(big)."""
  if small.shape[1] == 0:
    return 0.0
  resid = small - big @ (big.T @ small)
  return float(np.linalg.norm(resid, 2))


def _bases(sub, k):
  u = np.asarray(cj.protected_basis(sub, "left"))[..., :k]
  v = np.asarray(cj.protected_basis(sub, "right"))[..., :k]
  return u, v


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("k", [0, 1, 4, 5, 8])
def test_fresh_subspace_is_top_singular_span(shape, k):
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape))
  sub = cj.compute_subspaces({"w": w}, {"w": k})["w"]
  assert int(sub.rank) == k
  u, v = _bases(sub, k)
  su, _, svt = np.linalg.svd(w)
  assert _span_distance(u, su[:, :k]) < 1e-5
  assert _span_distance(v, svt[:k].T) < 1e-5
  # Orthonormal.
  np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
  np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-5)


def test_stacked_layers_get_per_layer_ranks_in_one_call():
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 10, 6)))
  ranks = np.array([0, 2, 5], np.int32)
  sub = cj.compute_subspaces({"w": w}, {"w": ranks})["w"]
  np.testing.assert_array_equal(np.asarray(sub.rank), ranks)
  for layer, k in enumerate(ranks):
    one = cj.compute_subspaces({"w": w[layer]}, {"w": int(k)})["w"]
    u_stack, v_stack = _bases(jax.tree.map(lambda x, i=layer: x[i], sub), k)
    u_one, v_one = _bases(one, k)
    assert _span_distance(u_stack, u_one) < 1e-5 and _span_distance(v_stack, v_one) < 1e-5


def test_accumulation_without_training_equals_direct_svd():
  """With W unchanged, growing k1 -> k2 reaches the top-k2 span of W (the complement's top = W's next ones)."""
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (14, 9)))
  old = cj.compute_subspaces({"w": w}, {"w": 3})
  new = cj.compute_subspaces({"w": w}, {"w": 6}, previous=old)["w"]
  direct = cj.compute_subspaces({"w": w}, {"w": 6})["w"]
  for a, b in zip(_bases(new, 6), _bases(direct, 6)):
    assert _span_distance(a, b) < 1e-4


def _train(w0, subs, steps=100, seed=3):
  tx = cj.constrained(optax.adam(5e-2))
  params = {"w": jnp.asarray(w0)}
  state = cj.set_subspaces(tx.init(params), subs)
  keys = jax.random.split(jax.random.PRNGKey(seed), steps)
  target = jax.random.normal(jax.random.PRNGKey(seed + 1), w0.shape) * 3

  @jax.jit
  def step(params, state, key):
    g = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(params)
    g = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(key, x.shape), g)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for key in keys:
    params, state = step(params, state, key)
  return np.asarray(params["w"])


def test_accumulation_after_training_contains_old_and_adds_complement_top():
  w0 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (12, 8)))
  k1, k2 = 3, 5
  old = cj.compute_subspaces({"w": w0}, {"w": k1})
  w1 = _train(w0, old)
  assert np.abs(w1 - w0).max() > 0.5
  new = cj.compute_subspaces({"w": w1}, {"w": k2}, previous=old)["w"]
  u_old, v_old = _bases(old["w"], k1)
  u_new, v_new = _bases(new, k2)
  # The old subspace is contained exactly (principal angles 0).
  assert _contains(u_new, u_old) < 1e-5 and _contains(v_new, v_old) < 1e-5
  # The added directions are the top singular directions of R = (I - UU^T) W1 (I - VV^T).
  r = (np.eye(12) - u_old @ u_old.T) @ w1 @ (np.eye(8) - v_old @ v_old.T)
  ru, _, rvt = np.linalg.svd(r)
  added_u = ru[:, : k2 - k1]
  added_v = rvt[: k2 - k1].T
  assert _span_distance(u_new, np.concatenate([u_old, added_u], 1)) < 1e-4
  assert _span_distance(v_new, np.concatenate([v_old, added_v], 1)) < 1e-4
  # Theory (docs/design.md §3): W1 stays block-diagonal in [U, U_perp] x [V, V_perp], so the old singular triplets
  # are still exact singular triplets of W1 and the protected block U^T W V did not move.
  np.testing.assert_allclose((np.eye(12) - u_old @ u_old.T) @ w1 @ v_old, 0.0, atol=1e-4)
  np.testing.assert_allclose(u_old.T @ w1 @ (np.eye(8) - v_old @ v_old.T), 0.0, atol=1e-4)
  np.testing.assert_allclose(u_old.T @ w1 @ v_old, u_old.T @ w0 @ v_old, atol=1e-4)


def test_accumulation_is_monotone_across_representation_flip():
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (10, 10)))
  previous = None
  spans = []
  for k in [2, 4, 6, 9]:
    previous = cj.compute_subspaces({"w": w}, {"w": k}, previous=previous)
    spans.append(_bases(previous["w"], k))
  for (u_a, v_a), (u_b, v_b) in zip(spans, spans[1:]):
    assert _contains(u_b, u_a) < 1e-5 and _contains(v_b, v_a) < 1e-5
  assert bool(previous["w"].left_allow) and bool(previous["w"].right_allow)


def test_singular_values_are_returned_for_energy_policies():
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (6, 4)))
  _, svals = cj.compute_subspaces({"w": w}, {"w": 0}, return_singular_values=True)
  np.testing.assert_allclose(np.asarray(svals["w"]), np.linalg.svd(w, compute_uv=False), rtol=1e-5)


def test_ranks_as_pytree_and_unconstrained_leaves():
  params = {"a": {"w": np.ones((4, 3)), "b": np.ones(3)}, "c": np.ones((5, 5))}
  subs = cj.compute_subspaces(params, {"a": {"w": 1, "b": None}, "c": None})
  assert isinstance(subs["a"]["w"], cj.Subspace)
  assert subs["a"]["b"] is None and subs["c"] is None


@pytest.mark.parametrize(
    "params,ranks,previous_rank,pattern",
    [
        ({"w": np.ones((4, 3))}, {"w": 4}, None, r"'w'.*\[0, min\(m, n\)\] = \[0, 3\]"),
        ({"w": np.ones((4, 3))}, {"w": -1}, None, r"'w'.*\[0, 3\]"),
        ({"b": np.ones(3)}, {"b": 1}, None, r"'b' has shape \(3,\): only matrices"),
        ({"w": np.ones((4, 3))}, {"w": 1}, 2, r"ranks for 'w' shrink from 2 to 1"),
        ({"w": np.ones((2, 4, 3))}, {"w": np.array([1, 2, 3])}, None, r"'w'.*shape \(2,\)"),
        ({"w": np.ones((4, 3))}, {"v": 1}, None, r"do not exist: \['v'\]"),
        ({"w": np.ones((4, 3))}, {"w": 1.5}, None, r"rank for 'w' must be an integer"),
    ],
)
def test_bad_input_names_the_parameter(params, ranks, previous_rank, pattern):
  previous = None
  if previous_rank is not None:
    previous = cj.compute_subspaces(params, {k: previous_rank for k in params})
  with pytest.raises(ValueError, match=pattern):
    cj.compute_subspaces(params, ranks, previous=previous)


def test_rank_beyond_capacity_is_an_error():
  with pytest.raises(ValueError, match=re.escape("does not fit the left capacity 2")):
    cj.compute_subspaces({"w": np.ones((8, 8))}, {"w": 4}, capacity=2)


def test_previous_for_other_shape_is_an_error():
  prev = cj.compute_subspaces({"w": np.ones((4, 3))}, {"w": 1})
  with pytest.raises(ValueError, match=r"previous subspace of 'w' is for shape \(4, 3\)"):
    cj.compute_subspaces({"w": np.ones((5, 3))}, {"w": 1}, previous=prev)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    layers=st.sampled_from([(), (2,)]),
    rank_frac=st.floats(0.0, 1.0),
    sides=st.sampled_from(["both", "left", "right", "block"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_property_projection_invariants(m, n, layers, rank_frac, sides, seed):
  k = int(round(rank_frac * min(m, n)))
  key_w, key_g = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(key_w, layers + (m, n))
  g = jax.random.normal(key_g, layers + (m, n))
  sub = cj.compute_subspaces({"w": w}, {"w": np.full(layers, k, np.int32)})["w"]
  pg = np.asarray(cj.project(g, sub, sides)).reshape((-1, m, n))
  u_all = np.asarray(cj.protected_basis(sub, "left")).reshape((-1, m, m))[..., :k]
  v_all = np.asarray(cj.protected_basis(sub, "right")).reshape((-1, n, n))[..., :k]
  scale = max(float(np.linalg.norm(np.asarray(g))), 1.0)
  for u, v, d in zip(u_all, v_all, pg):
    assert np.linalg.norm(u.T @ d @ v) <= 1e-5 * scale
    if sides in ("both", "left"):
      assert np.linalg.norm(u.T @ d) <= 1e-5 * scale
    if sides in ("both", "right"):
      assert np.linalg.norm(d @ v) <= 1e-5 * scale
  # A projection: applying it twice changes nothing.
  ppg = np.asarray(cj.project(cj.project(g, sub, sides), sub, sides)).reshape((-1, m, n))
  np.testing.assert_allclose(ppg, pg, atol=1e-5 * scale)


def test_activation_source_protects_the_inputs_the_old_task_used():
  """docs/design.md §4b: right bases from the input covariance keep W x fixed for every old input x (GPM with
  sides=right)."""
  rng = np.random.RandomState(0)
  x_old = rng.randn(3, 64).T @ rng.randn(3, 10)  # 64 inputs in a 3-dim subspace of R^10
  w0 = jnp.asarray(rng.randn(6, 10), jnp.float32)
  cov = x_old.T @ x_old
  subs = cj.compute_subspaces({"w": w0}, {"w": 3}, covariances={"w": cov})
  tx = cj.constrained(optax.adam(5e-2), sides="right")
  params = {"w": w0}
  state = cj.set_subspaces(tx.init(params), subs)
  for key in jax.random.split(jax.random.PRNGKey(0), 20):
    u, state = tx.update({"w": jax.random.normal(key, (6, 10))}, state, params)
    params = optax.apply_updates(params, u)
  w1 = np.asarray(params["w"])
  assert np.abs(w1 - np.asarray(w0)).max() > 0.3
  np.testing.assert_allclose(x_old @ w1.T, x_old @ np.asarray(w0).T, atol=1e-4)
  # Accumulating from a second task's inputs keeps the first subspace.
  x_new = rng.randn(2, 64).T @ rng.randn(2, 10)
  grown = cj.compute_subspaces(params, {"w": 5}, previous=subs, covariances={"w": x_new.T @ x_new})
  v_old = np.asarray(cj.protected_basis(subs["w"], "right"))[:, :3]
  v_new = np.asarray(cj.protected_basis(grown["w"], "right"))[:, :5]
  assert _contains(v_new, v_old) < 1e-5
  assert _contains(v_new, np.linalg.svd(x_new.T)[0][:, :2]) < 1e-4


def test_covariance_of_wrong_shape_names_the_parameter():
  with pytest.raises(ValueError, match=r"input covariance of 'w' has shape \(4, 4\); expected \(3, 3\)"):
    cj.compute_subspaces({"w": np.ones((4, 3))}, {"w": 1}, covariances={"w": np.eye(4)})
