"""A method's loss terms in the train step (``step.LossTerms``): the penalty's gradient is added once per step
(also with micro-batches), ``model_params`` maps the trained tree to what the model sees, against jax.grad of the
written-out loss on a toy decoder whose logits are an embedding lookup."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clsvd_jax.train import step as step_lib

V, B, T = 11, 4, 6


def _apply(params, input_ids, attention_mask):
  del attention_mask
  return params["emb"][input_ids] * params["scale"]


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  loss_mask = np.zeros((B, T), np.float32)
  loss_mask[:, T // 2:] = 1.0
  loss_mask[0, -1] = 0.0  # rows with different token counts: the mean is per token, not per row
  return {"input_ids": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
          "attention_mask": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.asarray(loss_mask)}


def _params(seed=1):
  k = jax.random.key(seed)
  return {"emb": jax.random.normal(k, (V, V)), "scale": jnp.asarray(1.3)}


def _sgd_step(terms, grad_accum=1):
  # SGD with learning rate 1 and no clipping: the update is minus the gradient the step formed.
  return jax.jit(step_lib.make_train_step(_apply, optax.sgd(1.0), kind="decoder", schedule=optax.constant_schedule(1.0),
                                          grad_accum=grad_accum, loss_terms=terms))


def _token_mean(model_params, batch):
  total, count = step_lib.token_losses(_apply, model_params, batch, "decoder")
  return total / count


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_penalty_gradient_is_added_once_per_step(grad_accum):
  params, batch = _params(), _batch()
  anchor = jax.tree.map(lambda x: x + 0.5, params)
  penalty = lambda p, aux, opt_state: 0.7 * sum(jnp.sum((a - b) ** 2) for a, b in
                                                zip(jax.tree.leaves(p), jax.tree.leaves(aux)))
  step = _sgd_step(step_lib.LossTerms(penalty=penalty), grad_accum)
  opt_state = optax.sgd(1.0).init(params)
  new, _, _, metrics = step(params, opt_state, batch, step_lib.StepCarry(jnp.int32(0), jnp.int32(-1)), anchor)
  want_grad = jax.grad(lambda p: _token_mean(p, batch) + penalty(p, anchor, None))(params)
  for path in ("emb", "scale"):
    np.testing.assert_allclose(np.asarray(params[path] - new[path]), np.asarray(want_grad[path]), rtol=2e-5,
                               atol=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(_token_mean(params, batch)), rel=1e-6)
  assert float(metrics["penalty"]) == pytest.approx(float(penalty(params, anchor, None)), rel=1e-6)


def test_model_params_maps_the_trained_tree():
  base, batch = _params(), _batch(3)
  delta = {"emb": 0.1 * jax.random.normal(jax.random.key(5), (V, V))}
  model_params = lambda d, b: {"emb": b["emb"] + 2.0 * d["emb"], "scale": b["scale"]}
  step = _sgd_step(step_lib.LossTerms(model_params=model_params))
  new, _, _, metrics = step(delta, optax.sgd(1.0).init(delta), batch,
                            step_lib.StepCarry(jnp.int32(0), jnp.int32(-1)), base)
  want = jax.grad(lambda d: _token_mean(model_params(d, base), batch))(delta)
  np.testing.assert_allclose(np.asarray(delta["emb"] - new["emb"]), np.asarray(want["emb"]), rtol=2e-5, atol=1e-6)
  assert float(metrics["loss"]) == pytest.approx(float(_token_mean(model_params(delta, base), batch)), rel=1e-6)
  assert "penalty" not in metrics
