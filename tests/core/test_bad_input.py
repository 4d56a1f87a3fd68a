"""The core API's failure modes (issue 8, section 5), each with the issue's reproducer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj


def test_matrix_with_a_dimension_of_one_gets_a_subspace():
  # Was: ZeroDivisionError (the side of dimension 1 stores no column).
  params = {"head": jnp.ones((64, 1))}
  sub0 = cj.compute_subspaces(params, {"head": 0})["head"]
  assert sub0.capacity == (1, 0) and int(sub0.rank) == 0  # the input side (dimension 1) stores no column
  full = cj.compute_subspaces(params, {"head": 1}, previous={"head": sub0})["head"]
  assert int(full.rank) == 1 and not bool(full.left_allow) and bool(full.right_allow)  # right: "allow nothing"
  # Rank 1 of a 64 x 1 matrix protects its only input direction: nothing may move.
  g = jax.random.normal(jax.random.PRNGKey(0), (64, 1))
  np.testing.assert_array_equal(np.asarray(cj.project(g, full, "right")), 0.0)
  np.testing.assert_array_equal(np.asarray(cj.project(g, sub0)), np.asarray(g))
  tx = cj.constrained(optax.sgd(1.0))  # the default mask selects such leaves
  state = cj.set_subspaces(tx.init(params), {"head": full})
  updates, _ = jax.jit(tx.update)({"head": g}, state, params)
  np.testing.assert_array_equal(np.asarray(updates["head"]), 0.0)


@pytest.mark.parametrize("capacity", [-1, (2, -3), (1, 2, 3), 1.5, True])
def test_bad_capacity_is_a_clear_error(capacity):
  with pytest.raises(ValueError, match=r"capacity must be a non-negative int or a pair"):
    cj.compute_subspaces({"w": jnp.ones((8, 6))}, {"w": 2}, capacity=capacity)
  with pytest.raises(ValueError, match=r"capacity must be a non-negative int or a pair"):
    cj.constrained(optax.sgd(1.0), capacity=capacity).init({"w": jnp.ones((8, 6))})


def test_capacity_zero_holds_rank_zero_and_full_rank_only():
  w = jax.random.normal(jax.random.PRNGKey(1), (6, 6))
  none = cj.compute_subspaces({"w": w}, {"w": 0}, capacity=0)["w"]
  assert none.capacity == (0, 0)
  full = cj.compute_subspaces({"w": w}, {"w": 6}, capacity=(0, 0), previous={"w": none})["w"]
  g = jax.random.normal(jax.random.PRNGKey(2), (6, 6))
  np.testing.assert_array_equal(np.asarray(cj.project(g, none)), np.asarray(g))
  np.testing.assert_array_equal(np.asarray(cj.project(g, full, "right")), 0.0)
  with pytest.raises(ValueError, match=r"rank 2 of 'w' does not fit the left capacity 0"):
    cj.compute_subspaces({"w": w}, {"w": 2}, capacity=0)


def test_set_subspaces_with_a_constrained_path_left_out_raises():
  params = {"a": jnp.ones((6, 4)), "b": jnp.ones((5, 5))}
  tx = cj.constrained(optax.sgd(1.0))
  state = cj.set_subspaces(tx.init(params), cj.compute_subspaces(params, {"a": 2, "b": 1}))
  # Was: 'b' silently reset to rank 0.
  with pytest.raises(ValueError, match=r"omit constrained parameters \['b'\].*previous=get_subspaces"):
    cj.set_subspaces(state, {"a": cj.compute_subspaces(params, {"a": 3})["a"]})
  # The documented ways: a full tree keeps 'b', an explicit None resets it.
  kept = cj.set_subspaces(state, cj.compute_subspaces(params, {"a": 3}, previous=cj.get_subspaces(state)))
  assert int(cj.get_subspaces(kept)["b"].rank) == 1 and int(cj.get_subspaces(kept)["a"].rank) == 3
  reset = cj.set_subspaces(state, {"a": cj.get_subspaces(state)["a"], "b": None})
  assert int(cj.get_subspaces(reset)["b"].rank) == 0


def test_nan_importance_raises_instead_of_dropping_all_protection():
  with pytest.raises(ValueError, match=r"NaN or infinite for \['b'\]"):
    cj.normalize_importance({"a": np.array([0.2, 0.9]), "b": np.array([np.nan, 0.5])})
  with pytest.raises(ValueError, match=r"NaN or infinite for \['a'\]"):
    cj.normalize_importance({"a": np.inf})


def test_one_non_finite_gradient_entry_stays_where_it_is():
  w = jax.random.normal(jax.random.PRNGKey(3), (8, 6))
  sub = cj.compute_subspaces({"w": w}, {"w": 2})["w"]
  g = jax.random.normal(jax.random.PRNGKey(4), (8, 6)).at[3, 2].set(jnp.nan).at[5, 0].set(jnp.inf)
  bad = ~np.isfinite(np.asarray(g))
  clean = jnp.where(jnp.asarray(bad), 0.0, g)
  for sides in ("both", "left", "right", "block"):
    p = np.asarray(cj.project(g, sub, sides))
    np.testing.assert_array_equal(~np.isfinite(p), bad)
    assert np.isnan(p[3, 2]) and np.isposinf(p[5, 0])
    # Every other entry is the projection of the gradient with the bad entries taken as 0.
    np.testing.assert_array_equal(p[~bad], np.asarray(cj.project(clean, sub, sides))[~bad])
  # Rank 0 still equals the inner optimizer exactly, NaN included.
  params = {"w": w}
  tx = cj.constrained(optax.sgd(0.1))
  u, _ = tx.update({"w": g}, tx.init(params), params)
  ref, _ = optax.sgd(0.1).update({"w": g}, optax.sgd(0.1).init(params), params)
  np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(ref["w"]))
  # The case: zero_nans inside the constrained optimizer now zeroes one entry, not the whole update.
  tx = cj.constrained(optax.chain(optax.zero_nans(), optax.sgd(0.1)))
  state = cj.set_subspaces(tx.init(params), {"w": sub})
  g_nan = jnp.where(jnp.isinf(g), 1.0, g)
  u, _ = tx.update({"w": g_nan}, state, params)
  u = np.asarray(u["w"])
  assert np.isfinite(u).all() and np.count_nonzero(u) > 40
  basis = np.asarray(cj.protected_basis(sub, "left"))[:, :2]
  assert np.linalg.norm(basis.T @ u) <= 1e-5 * np.linalg.norm(u)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_or_covariances_raise(bad):
  w = np.ones((6, 4), np.float32)
  w[1, 2] = bad
  with pytest.raises(ValueError, match=r"parameter 'w' holds NaN or Inf"):
    cj.compute_subspaces({"w": w}, {"w": 1})
  cov = np.eye(4)
  cov[0, 0] = bad
  with pytest.raises(ValueError, match=r"input covariance of 'w' holds NaN or Inf"):
    cj.compute_subspaces({"w": np.ones((6, 4))}, {"w": 1}, covariances={"w": cov})


def test_previous_for_unknown_paths_raises():
  previous = cj.compute_subspaces({"w": jnp.ones((6, 4)), "old": jnp.ones((3, 3))}, {"w": 1, "old": 1})
  with pytest.raises(ValueError, match=r"previous holds subspaces for parameters that params lack: \['old'\]"):
    cj.compute_subspaces({"w": jnp.ones((6, 4))}, {"w": 2}, previous=previous)
  with pytest.raises(ValueError, match=r"previous hold a ndarray of shape \(6, 4\) at 'w'"):
    cj.compute_subspaces({"w": jnp.ones((6, 4))}, {"w": 2}, previous={"w": np.ones((6, 4))})


def test_initial_subspaces_missing_a_matrix_fail_at_init_with_a_clear_error():
  params = {"a": jnp.ones((6, 4)), "b": jnp.ones((5, 5))}
  partial = cj.compute_subspaces({"a": params["a"]}, {"a": 2})
  # Was: a pytree structure error at the first update.
  with pytest.raises(ValueError, match=r"subspaces lack parameters \['b'\]: give a tree shaped like params"):
    cj.constrained(optax.sgd(1.0), subspaces=partial).init(params)
  with pytest.raises(ValueError, match=r"subspaces lack parameters \['b'\]"):
    cj.orthogonal_projection(subspaces=partial).init(params)
  full = cj.compute_subspaces(params, {"a": 2, "b": None})
  state = cj.constrained(optax.sgd(1.0), subspaces=full).init(params)
  assert int(cj.get_subspaces(state)["a"].rank) == 2 and cj.get_subspaces(state)["b"] is None
