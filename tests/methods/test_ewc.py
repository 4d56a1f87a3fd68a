"""EWC: the diagonal Fisher of a tiny linear model against a hand computation in numpy, and the penalty's value and
gradient against the closed form (one task, several tasks, decay)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsvd_jax.methods import ewc

V = 7


def _linear_apply(params, input_ids, attention_mask=None):
  """A bigram model: logits of position t are row ``input_ids[t]`` of W plus a bias."""
  return params["w"][input_ids] + params["b"]


def _batch():
  ids = np.array([[3, 1, 3, 3, 5, 2],     # token 3 repeats: gradients add up within the example before squaring
                  [0, 0, 4, 6, 1, 3],
                  [2, 5, 5, 1, 0, 4],
                  [6, 6, 6, 6, 6, 6]], np.int32)
  loss = np.array([[0, 0, 1, 1, 1, 1],
                   [0, 0, 0, 1, 1, 0],
                   [0, 1, 1, 1, 1, 1],
                   [0, 1, 1, 1, 1, 1]], np.float32)
  weights = np.array([1, 1, 1, 0], np.float32)  # the last row is a filler row
  loss[3] = 0.0
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss, "weights": weights}


def _hand_fisher(params, batch):
  w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
  fw, fb, n = np.zeros_like(w), np.zeros_like(b), 0.0
  for ids, loss, weight in zip(batch["input_ids"], batch["loss_mask"], batch["weights"]):
    if weight == 0:
      continue
    gw, gb = np.zeros_like(w), np.zeros_like(b)
    for t in range(len(ids) - 1):
      if loss[t + 1]:
        z = w[ids[t]] + b
        p = np.exp(z - z.max())
        p /= p.sum()
        err = np.eye(V)[ids[t + 1]] - p  # d log p(next token) / d logits
        gw[ids[t]] += err
        gb += err
    fw, fb, n = fw + gw ** 2, fb + gb ** 2, n + 1
  return {"w": fw / n, "b": fb / n}


def _params(seed=0):
  rng = np.random.RandomState(seed)
  return {"w": jnp.asarray(rng.randn(V, V), jnp.float32), "b": jnp.asarray(0.3 * rng.randn(V), jnp.float32)}


def test_fisher_of_a_linear_model_matches_hand_computation():
  params, batch = _params(), _batch()
  fn = ewc.make_fisher_fn(_linear_apply, kind="decoder")
  fisher = ewc.fisher_diagonal(fn, params, [batch])
  want = _hand_fisher(params, batch)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(fisher[k]), want[k], rtol=1e-5, atol=1e-7)
  assert np.count_nonzero(want["w"]) > 5
  # Two batches average over all their real examples (3 + 3), not over batches.
  twice = ewc.fisher_diagonal(fn, params, [batch, batch])
  np.testing.assert_allclose(np.asarray(twice["w"]), want["w"], rtol=1e-5, atol=1e-7)
  # A frozen leaf gets a zero Fisher; the others are unchanged.
  frozen = ewc.fisher_diagonal(ewc.make_fisher_fn(_linear_apply, kind="decoder", trainable={"w": True, "b": False}),
                               params, [batch])
  assert not np.any(np.asarray(frozen["b"]))
  np.testing.assert_allclose(np.asarray(frozen["w"]), want["w"], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="calibration example"):
    ewc.fisher_diagonal(fn, params, [])


def _random_tree(rng, scale=1.0, positive=False):
  x = {"w": rng.randn(5, 4), "b": rng.randn(4)}
  return {k: jnp.asarray(np.abs(v) * scale if positive else v * scale, jnp.float32) for k, v in x.items()}


def _quad(theta, fisher, anchor):
  return sum(float(np.sum(np.asarray(fisher[k], np.float64) * (np.asarray(theta[k], np.float64)
                                                              - np.asarray(anchor[k], np.float64)) ** 2))
             for k in theta)


def test_penalty_gradient_is_lambda_fisher_times_displacement():
  rng = np.random.RandomState(1)
  lam = 3.5
  f1, star1 = _random_tree(rng, positive=True), _random_tree(rng)
  f1["w"] = f1["w"].at[0, 0].set(0.0)  # a zero Fisher entry: no pull there
  theta = _random_tree(rng)
  state = ewc.consolidate(ewc.init_state(theta), f1, star1)
  grad = jax.grad(ewc.penalty)(theta, state, lam)
  for k in theta:
    np.testing.assert_allclose(np.asarray(grad[k]), lam * np.asarray(f1[k]) * (np.asarray(theta[k])
                                                                               - np.asarray(star1[k])),
                               rtol=1e-5, atol=1e-6)
  assert float(grad["w"][0, 0]) == 0.0
  np.testing.assert_allclose(float(ewc.penalty(theta, state, lam)), lam / 2 * _quad(theta, f1, star1), rtol=1e-5)
  # At the anchor the penalty and its gradient vanish.
  assert float(ewc.penalty(star1, state, lam)) == pytest.approx(0.0, abs=1e-6)

  # A second task: value and gradient are those of the SUM of both tasks' penalties.
  f2, star2 = _random_tree(rng, positive=True), _random_tree(rng)
  state2 = ewc.consolidate(state, f2, star2)
  grad2 = jax.grad(ewc.penalty)(theta, state2, lam)
  for k in theta:
    want = lam * (np.asarray(f1[k]) * (np.asarray(theta[k]) - np.asarray(star1[k]))
                  + np.asarray(f2[k]) * (np.asarray(theta[k]) - np.asarray(star2[k])))
    np.testing.assert_allclose(np.asarray(grad2[k]), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(ewc.penalty(theta, state2, lam)),
                             lam / 2 * (_quad(theta, f1, star1) + _quad(theta, f2, star2)), rtol=1e-5)
  # Decay scales the older task's penalty.
  decayed = ewc.consolidate(state, f2, star2, decay=0.5)
  np.testing.assert_allclose(float(ewc.penalty(theta, decayed, lam)),
                             lam / 2 * (0.5 * _quad(theta, f1, star1) + _quad(theta, f2, star2)), rtol=1e-5)
  # The state is a pytree of arrays (checkpointable); the empty state is no penalty.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state2))
  assert float(ewc.penalty(theta, ewc.init_state(theta), lam)) == 0.0
  with pytest.raises(ValueError, match="decay"):
    ewc.consolidate(state, f2, star2, decay=1.5)
