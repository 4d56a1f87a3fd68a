"""GPM preset: after a task boundary built from the finished task's input activations, training the next task leaves
``W x`` unchanged for every x in the stored activation span (to 1e-5), the span holds the configured share of the
activation energy, and the projection is one-sided."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clsvd_jax as cj
from clsvd_jax import models
from clsvd_jax.config import OsftConfig
from clsvd_jax.methods import gpm
from clsvd_jax.train import scheduler as sched_lib
from clsvd_jax.train.step import token_losses

LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


def _batch(seed, low, high, rows=6, length=12):
  ids = np.random.RandomState(seed).randint(low, high, (rows, length)).astype(np.int32)
  loss = np.zeros(ids.shape, np.float32)
  loss[:, length // 2:] = 1.0
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


def test_gpm_config_is_the_one_sided_activation_preset():
  cfg = gpm.gpm_config(0.9, base=OsftConfig(min_trainable=3, calibration_batches=2))
  assert (cfg.sides, cfg.basis_source, cfg.rank_policy.name, cfg.rank_policy.eps) == ("right", "activations",
                                                                                      "energy", 0.9)
  assert cfg.start_protecting_from == 2 and cfg.project_gradients
  assert cfg.min_trainable == 3 and cfg.calibration_batches == 2  # the rest of the base is kept
  with pytest.raises(ValueError, match="eps"):
    gpm.gpm_config(0.0)


def test_stored_activation_span_is_untouched():
  eps = 0.9
  model = models.init_from_config(LLAMA, seed=0)
  apply_fn, params = models.functional(model)
  shapes = models.constrained_matrices(model)
  task1 = [_batch(0, 3, 40), _batch(1, 3, 40)]  # the finished task uses one part of the vocabulary...
  task2 = _batch(2, 40, 96)                      # ...the next task another
  covs = models.matrix_input_covariances(model, task1)

  constrained = lambda tree: cj.map_with_paths(lambda path, _: path in shapes, tree)
  tx = gpm.gpm_optimizer(optax.adamw(3e-2, weight_decay=0.1), mask=constrained)
  opt_state = tx.init(params)
  scheduler = sched_lib.TaskScheduler(gpm.gpm_config(eps), shapes, num_tasks=2)
  opt_state = scheduler.before_task(1, params, opt_state, sched_lib.BoundaryInputs(covariances=covs))
  assert scheduler.records[-1]["protected"]

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: token_losses(apply_fn, p, task2, "decoder")[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new = params
  for _ in range(5):
    new, opt_state = step(new, opt_state)

  subs = cj.flatten_with_paths(cj.get_subspaces(opt_state), is_leaf=lambda x: x is None or isinstance(x, cj.Subspace))
  old_flat, new_flat = cj.flatten_with_paths(params), cj.flatten_with_paths(new)
  # V V^T (the projector onto the stored input span) and U U^T dW, per stacked layer; one compile per shape.
  projections = jax.jit(lambda sub, dw: (cj.protected_right(sub, jnp.broadcast_to(jnp.eye(dw.shape[-1]), dw.shape[:-2]
                                                                                  + (dw.shape[-1],) * 2)),
                                         cj.protected_left(sub, dw)))
  partial, capped, left_moved = 0, 0, 0.0
  rng = np.random.RandomState(0)
  for path, shape in shapes.items():
    sub = subs[path]
    n = shape[-1]
    k = np.asarray(sub.rank)
    cov = np.asarray(covs[path], np.float64)
    w_old, w_new = np.asarray(old_flat[path], np.float64), np.asarray(new_flat[path], np.float64)
    dw = w_new - w_old
    proj, left = (np.asarray(x, np.float64) for x in projections(sub, jnp.asarray(dw, jnp.float32)))
    for layer in range(shape[0]):
      assert np.trace(proj[layer]) == pytest.approx(k[layer], abs=1e-3)
      # GPM's criterion: the span holds at least eps of the finished task's input energy, unless the rank hit its
      # cap. Ranks are shared by both sides, so they stop at min(m, n) - min_trainable even for a one-sided right
      # projection: a wide matrix (m < n, here k/v under grouped-query attention) cannot store its whole input span.
      inside = np.trace(proj[layer] @ cov[layer])
      cap = min(shape[-2:]) - 1
      assert inside >= eps * np.trace(cov[layer]) * (1 - 1e-5) or k[layer] == cap, (path, layer)
      capped += int(k[layer] == cap and shape[-2] < n)
      partial += int(k[layer] < n)
      # W x is unchanged for x in the stored span (random vectors projected onto it).
      x = proj[layer] @ rng.randn(n, 8)
      assert np.linalg.norm(dw[layer]) > 1e-3, path  # the matrix did train
      rel = np.linalg.norm(dw[layer] @ x) / np.linalg.norm(w_old[layer] @ x)
      assert rel < 1e-5, (path, layer, rel)
      # One-sided: the left basis the scheduler also computed is NOT protected by this preset.
      left_moved = max(left_moved, np.linalg.norm(left[layer]) / np.linalg.norm(dw[layer]))
  assert partial > 0  # some spans are proper subspaces: the threshold, not the dimension, set the rank
  assert capped > 0  # the k/v projections (8 x 16) are capped at rank 7 of their 16 input directions
  assert left_moved > 1e-2
