"""constrained() around many inner optimizers, in optax loops and through nnx.Optimizer.

For each inner optimizer (as optax's contrib ``_common_test.py`` runs one battery over its optimizers): the
invariant holds after a few jitted steps and across two subspace swaps that compile nothing new, and rank 0 equals
the inner optimizer exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clsvd_jax as cj

TOL = 1e-5
STEPS = 4

INNER = {
    "sgd": lambda: optax.sgd(1e-2, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "adafactor": lambda: optax.adafactor(1e-2),
    "muon": lambda: optax.contrib.muon(1e-2),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2),
}
RANKS = [{"w": 2, "stack": np.array([1, 2], np.int32)}, {"w": 5, "stack": np.array([3, 5], np.int32)}]


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (10, 7)), "stack": jax.random.normal(k2, (2, 6, 8)), "bias": jnp.zeros(7)}


def _grads(params, key):
  keys = jax.random.split(key, 3)
  # A component along the weights themselves pushes hard on the protected span.
  return {name: jax.random.normal(k, p.shape) + 0.5 * p for (name, p), k in zip(sorted(params.items()), keys)}


def _ratios(dw, sub):
  """Largest ||U^T dW|| / ||dW|| and ||dW V|| / ||dW|| over the stacked [out, in] matrices of ``dw``."""
  m, n = sub.matrix_shape
  dws = np.asarray(dw).reshape(-1, m, n)
  us = np.asarray(cj.protected_basis(sub, "left")).reshape(-1, m, m)
  vs = np.asarray(cj.protected_basis(sub, "right")).reshape(-1, n, n)
  ranks = np.asarray(sub.rank).reshape(-1)
  out = [0.0, 0.0]
  for d, u, v, k in zip(dws, us, vs, ranks):
    norm = np.linalg.norm(d)
    assert norm > 1e-4  # it moved
    out = [max(out[0], np.linalg.norm(u[:, :k].T @ d) / norm), max(out[1], np.linalg.norm(d @ v[:, :k]) / norm)]
  return out


@pytest.mark.parametrize("name", sorted(INNER))
def test_invariant_across_subspace_swaps_without_recompiling(name):
  tx = cj.constrained(INNER[name]())
  params = _params()
  state = tx.init(params)
  traces = []

  @jax.jit
  def run(params, state, key):
    traces.append(1)

    def body(carry, k):
      p, s, total = carry
      u, s = tx.update(_grads(p, k), s, p)
      return (optax.apply_updates(p, u), s, jax.tree.map(jnp.add, total, u)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (params, state, total), _ = jax.lax.scan(body, (params, state, zeros), jax.random.split(key, STEPS))
    return params, state, total

  for task, ranks in enumerate(RANKS):
    subs = cj.compute_subspaces(params, ranks, previous=cj.get_subspaces(state))
    state = cj.set_subspaces(state, subs)
    params, state, total = run(params, state, jax.random.PRNGKey(task))
    for path in ("w", "stack"):
      left, right = _ratios(total[path], subs[path])
      assert left <= TOL and right <= TOL, (path, left, right)
    assert float(jnp.abs(total["bias"]).max()) > 0  # unconstrained leaves train as with the inner optimizer
  assert len(traces) == 1


@pytest.mark.parametrize("name", sorted(INNER))
def test_rank_zero_equals_the_inner_optimizer_exactly(name):
  inner = INNER[name]()
  tx = cj.constrained(inner)
  params = ref_params = _params()
  state, ref_state = tx.init(params), inner.init(params)
  # Op by op the arithmetic is identical: zero bases project nothing, bit for bit.
  for key in jax.random.split(jax.random.PRNGKey(1), 2):
    u, state = tx.update(_grads(params, key), state, params)
    ref_u, ref_state = inner.update(_grads(ref_params, key), ref_state, ref_params)
    for path in u:
      np.testing.assert_array_equal(np.asarray(u[path]), np.asarray(ref_u[path]))
    params, ref_params = optax.apply_updates(params, u), optax.apply_updates(ref_params, ref_u)


def test_schedule_free_eval_params_made_to_keep_the_invariant():
  """schedule_free's evaluation point mixes in its z sequence, which Adam's scaling moves into the protected span;
  ``params + P(eval - params)`` is the nearest point that keeps the invariant (the README's recipe)."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (10, 7))}
  subs = cj.compute_subspaces(params, {"w": 3})
  tx = cj.constrained(optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2))
  state = cj.set_subspaces(tx.init(params), subs)
  p = params
  for key in jax.random.split(jax.random.PRNGKey(2), 10):
    u, state = tx.update({"w": jax.random.normal(key, (10, 7)) + 0.5 * p["w"]}, state, p)
    p = optax.apply_updates(p, u)
  raw = optax.contrib.schedule_free_eval_params(state.inner_state, p)
  fixed = jax.tree.map(jnp.add, p, cj.project_updates(jax.tree.map(jnp.subtract, raw, p), cj.get_subspaces(state)))
  u_basis = np.asarray(cj.protected_basis(subs["w"], "left"))[:, :3]
  leak = lambda e: np.linalg.norm(u_basis.T @ np.asarray(e["w"] - params["w"])) / np.linalg.norm(e["w"] - params["w"])
  assert leak(raw) > 1e-3  # the leak is real...
  assert leak(fixed) <= 2 * TOL  # ... and the recipe removes it


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 10, rngs=rngs)
    self.l2 = nnx.Linear(10, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _kernels(model):
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {name: np.asarray(state[name]["kernel"]) for name in ("l1", "l2")}


@pytest.mark.parametrize("name", sorted(INNER))
def test_through_nnx_optimizer(name):
  model = _Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, cj.constrained(INNER[name]()), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, opt, x, y):
    traces.append(1)
    opt.update(model, nnx.grad(_loss)(model, x, y))

  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  for task, (k1, k2) in enumerate([(2, 1), (5, 3)]):
    subs = cj.compute_subspaces(nnx.state(model, nnx.Param), {"l1/kernel": k1, "l2/kernel": k2},
                                previous=cj.get_subspaces(opt.opt_state))
    opt.opt_state = cj.set_subspaces(opt.opt_state, subs)
    before = _kernels(model)
    for _ in range(STEPS):
      step(model, opt, x, jnp.sin(2.0 * x[:, :4] + task))
    after = _kernels(model)
    for layer in ("l1", "l2"):
      dw = (after[layer] - before[layer]).T  # the [out, in] matrix the subspace describes
      left, right = _ratios(dw, subs[layer]["kernel"])
      # Measured on the weights, so float32 rounding of W (|W| ~ 1) adds to the projection's own error.
      assert left <= 10 * TOL and right <= 10 * TOL, (layer, left, right)
  assert len(traces) == 1

  # Rank 0 through nnx.Optimizer equals the inner optimizer through nnx.Optimizer, bit for bit (op by op).
  m_c, m_ref = _Net(nnx.Rngs(1)), _Net(nnx.Rngs(1))
  o_c = nnx.Optimizer(m_c, cj.constrained(INNER[name]()), wrt=nnx.Param)
  o_ref = nnx.Optimizer(m_ref, INNER[name](), wrt=nnx.Param)
  for _ in range(2):
    o_c.update(m_c, nnx.grad(_loss)(m_c, x, x[:, :4]))
    o_ref.update(m_ref, nnx.grad(_loss)(m_ref, x, x[:, :4]))
  for a, b in zip(jax.tree.leaves(nnx.state(m_c, nnx.Param)), jax.tree.leaves(nnx.state(m_ref, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
