"""The invariant U^T dW = 0, dW V = 0 (and each variant's own) under long runs of constrained AdamW."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj

STEPS = 300
TOL = 1e-5


def _random_matrix(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def _explicit_bases(sub):
  """Explicit protected bases [..., d, k_max] (zero past each matrix's rank)."""
  return cj.protected_basis(sub, "left"), cj.protected_basis(sub, "right")


@functools.partial(jax.jit, static_argnames=("tx", "steps"))
def _run(tx, w0, state, key, steps):
  """Runs ``steps`` updates on random gradients; returns the summed update, the max per-step ratios and params."""

  def body(carry, k):
    params, st, total = carry
    # Gradients with a large component along the weight itself, so the protected span gets pushed hard.
    g = {"w": jax.random.normal(k, w0.shape) + 0.5 * params["w"]}
    u, st = tx.update(g, st, params)
    params = optax.apply_updates(params, u)
    return (params, st, total + u["w"]), None

  init = ({"w": w0}, state, jnp.zeros_like(w0))
  (params, _, total), _ = jax.lax.scan(body, init, jax.random.split(key, steps))
  return total, params["w"]


def _setup(shape, rank, sides="both", seed=0, inner=None):
  key = jax.random.PRNGKey(seed)
  w0 = _random_matrix(key, shape)
  batch = shape[:-2]
  ranks = {"w": np.full(batch, rank, np.int32)}
  subs = cj.compute_subspaces({"w": w0}, ranks)
  inner = inner or optax.adamw(1e-2, weight_decay=0.1)
  tx = cj.constrained(inner, sides=sides)
  state = cj.set_subspaces(tx.init({"w": w0}), subs)
  return tx, w0, state, subs["w"]


def _rel(x, ref):
  return float(jnp.linalg.norm(x) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def _per_matrix_ratios(dw, u, v):
  """max over stacked matrices of ||U^T dW|| / ||dW|| and ||dW V|| / ||dW||."""
  dw = dw.reshape((-1,) + dw.shape[-2:])
  u = u.reshape((-1,) + u.shape[-2:])
  v = v.reshape((-1,) + v.shape[-2:])
  left = max(_rel(ui.T @ di, di) for ui, di in zip(u, dw))
  right = max(_rel(di @ vi, di) for vi, di in zip(v, dw))
  both = max(_rel(ui.T @ di @ vi, di) for ui, vi, di in zip(u, v, dw))
  return left, right, both


SHAPES = [(12, 8), (8, 12), (10, 10), (3, 12, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rank_kind", ["zero", "small", "large", "full"])
def test_two_sided_invariant_over_300_adamw_steps(shape, rank_kind):
  r = min(shape[-2:])
  rank = {"zero": 0, "small": 2, "large": r - 2, "full": r}[rank_kind]
  tx, w0, state, sub = _setup(shape, rank)
  dw, _ = _run(tx, w0, state, jax.random.PRNGKey(1), STEPS)
  u, v = _explicit_bases(sub)
  if rank == r:
    np.testing.assert_array_equal(np.asarray(dw), 0.0)
    return
  assert float(jnp.linalg.norm(dw)) > 0.1  # it did learn
  left, right, _ = _per_matrix_ratios(dw, u, v)
  assert left <= TOL and right <= TOL, (left, right)


@pytest.mark.parametrize(
    "sides,expect_left,expect_right",
    [("left", True, False), ("right", False, True), ("block", False, False)],
)
def test_each_variant_has_its_own_invariant(sides, expect_left, expect_right):
  tx, w0, state, sub = _setup((12, 8), 3, sides=sides)
  dw, _ = _run(tx, w0, state, jax.random.PRNGKey(2), STEPS)
  u, v = _explicit_bases(sub)
  left, right, both = _per_matrix_ratios(dw, u, v)
  assert both <= TOL  # U^T dW V = 0 holds for every variant
  # Each variant protects exactly its own side(s): the other side visibly moves.
  assert (left <= TOL) == expect_left, left
  assert (right <= TOL) == expect_right, right
  if sides == "block":
    assert left > 1e-2 and right > 1e-2


@pytest.mark.parametrize("shape,rank", [((16, 12), 3), ((16, 12), 7), ((16, 12), 10), ((9, 9), 5), ((2, 9, 9), 4)])
def test_invariant_when_representation_flips(shape, rank):
  tx, w0, state, sub = _setup(shape, rank)
  m, n = shape[-2:]
  c_left, c_right = sub.capacity
  assert bool(np.all(np.asarray(sub.left_allow) == (rank > c_left)))
  assert bool(np.all(np.asarray(sub.right_allow) == (rank > c_right)))
  dw, _ = _run(tx, w0, state, jax.random.PRNGKey(3), STEPS)
  u, v = _explicit_bases(sub)
  left, right, _ = _per_matrix_ratios(dw, u, v)
  assert left <= TOL and right <= TOL
  if m == n:  # square: the stored form never costs more than the matrix (see default_capacity for the rest)
    assert m * c_left + n * c_right <= m * n


@pytest.mark.parametrize("shape", [(256, 256), (688, 256), (256, 688), (1024, 4096), (11008, 4096)])
def test_capacity_with_rank_cap_stays_below_the_weight(shape):
  m, n = shape
  c_left, c_right = cj.default_capacity(m, n, max_rank_ratio=0.8)
  assert m * c_left + n * c_right <= m * n
  # ... and it still represents every rank up to the cap on both sides.
  for k in range(0, int(np.ceil(0.8 * min(m, n))) + 1, max(1, min(m, n) // 97)):
    assert min(k, m - k) <= c_left and min(k, n - k) <= c_right


def test_rank_zero_equals_inner_optimizer_exactly():
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx, w0, state, _ = _setup((3, 12, 8), 0, inner=inner)
  ref_state = inner.init({"w": w0})
  params = ref_params = {"w": w0}
  # Op by op (no jit) the arithmetic is identical, so the results are bitwise equal: zero bases project nothing.
  for k in jax.random.split(jax.random.PRNGKey(4), 5):
    g = {"w": jax.random.normal(k, w0.shape)}
    u, state = tx.update(g, state, params)
    ref_u, ref_state = inner.update(g, ref_state, ref_params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(ref_u["w"]))
    params, ref_params = optax.apply_updates(params, u), optax.apply_updates(ref_params, ref_u)
  # Jitted over many steps XLA may fuse the two programs differently: equal to float rounding.
  dw, w_final = _run(tx, w0, state, jax.random.PRNGKey(4), 50)
  ref_dw, ref_final = _run(optax.with_extra_args_support(inner), w0, ref_state, jax.random.PRNGKey(4), 50)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(w_final), np.asarray(ref_final), rtol=0, atol=1e-6)


def test_protected_response_is_preserved_in_params():
  """W V and U^T W do not change over training (the statement users care about), up to f32 rounding of W."""
  tx, w0, state, sub = _setup((12, 8), 3)
  _, w1 = _run(tx, w0, state, jax.random.PRNGKey(5), STEPS)
  u, v = _explicit_bases(sub)
  np.testing.assert_allclose(np.asarray(w1 @ v), np.asarray(w0 @ v), atol=2e-5)
  np.testing.assert_allclose(np.asarray(u.T @ w1), np.asarray(u.T @ w0), atol=2e-5)
  assert float(jnp.abs(w1 - w0).max()) > 0.1


def test_unprojected_moments_leak_without_final_projection():
  """Why the final update is projected: Adam on a projected gradient alone leaks into the protected span."""
  key = jax.random.PRNGKey(6)
  w0 = _random_matrix(key, (12, 8))
  subs = cj.compute_subspaces({"w": w0}, {"w": 3})
  leaky = optax.chain(cj.orthogonal_projection(subspaces=subs), optax.adamw(1e-2, weight_decay=0.1))
  dw, _ = _run(optax.with_extra_args_support(leaky), w0, leaky.init({"w": w0}), jax.random.PRNGKey(7), 50)
  u, v = _explicit_bases(subs["w"])
  left, right, _ = _per_matrix_ratios(dw, u, v)
  assert left > 1e-3 and right > 1e-3
