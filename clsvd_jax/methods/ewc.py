"""Elastic weight consolidation: the diagonal Fisher of each finished task and a quadratic penalty towards its weights.

After task t the runner measures, on calibration batches of the task's training data,

    F_t = mean over examples of (d/dtheta log p(y | x; theta_t))^2,

the diagonal of the empirical Fisher: per-example gradients of the summed log-likelihood of the example's target
tokens (teacher forcing, the training loss of one row), squared, averaged over examples. The penalty added to the
loss of every later task is

    lambda / 2 * sum_{s <= t} decay^(t - s) * sum_i F_s,i (theta_i - theta_s,i)^2.

With ``decay = 1`` (the default) this is the sum of the per-task penalties of the original EWC, not an
approximation: a sum of diagonal quadratics is one diagonal quadratic, so the state keeps one Fisher
``F = sum_s F_s``, one anchor (the F-weighted mean of the theta_s) and one scalar offset, and reproduces the value
and the gradient ``lambda * sum_s F_s (theta - theta_s)`` exactly at the memory of two parameter copies, whatever
the number of tasks. ``decay < 1`` discounts older tasks geometrically. (This differs from "online EWC" of Schwarz
et al. 2018, which also moves the anchor to the latest weights only.)

The state is a NamedTuple of arrays: it goes into checkpoints with the parameters and restores bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clsvd_jax.train.step import TRAIN_KEYS, token_losses

FisherFn = Callable[[Any, Mapping[str, Any]], tuple[Any, jax.Array]]


class EwcState(NamedTuple):
  """The accumulated penalty ``sum_i fisher_i (theta_i - anchor_i)^2 + offset`` (before ``lambda / 2``).

  Attributes:
    fisher: float32 tree like the parameters: the (decayed) sum of the finished tasks' diagonal Fishers.
    anchor: float32 tree like the parameters: the Fisher-weighted mean of the finished tasks' weights.
    offset: float32 scalar that makes the penalty's value (not only its gradient) the sum of per-task penalties.
  """

  fisher: Any
  anchor: Any
  offset: jax.Array


def init_state(params: Any) -> EwcState:
  """No finished task: a zero penalty."""
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  return EwcState(zeros, zeros, jnp.zeros((), jnp.float32))


def make_fisher_fn(apply_fn: Callable[..., Any], *, kind: str, trainable: Any = None) -> FisherFn:
  """A jitted ``fisher_sum(params, batch) -> (sum of squared per-example gradients, number of examples)``.

  Args:
    apply_fn: the model's pure apply function (``clsvd_jax.models.functional``).
    kind: ``encoder_decoder`` or ``decoder`` (the training batch layout, ``clsvd_jax.data.batching``).
    trainable: a pytree of Python bools like params; ``False`` leaves get a zero Fisher and their gradient is never
      formed (frozen parameters never move, so their penalty is constant). None: every leaf.

  The examples of a batch are visited one at a time (``lax.scan``), so memory stays at one gradient; filler rows
  (``weights`` 0) count for nothing.
  """
  keys = TRAIN_KEYS[kind]

  def log_likelihood(params: Any, row: Mapping[str, Any]) -> jax.Array:
    total, _ = token_losses(apply_fn, params, jax.tree.map(lambda x: x[None], row), kind)
    return -total

  grad_one = jax.grad(log_likelihood)

  @jax.jit
  def fisher_sum(params: Any, batch: Mapping[str, Any]) -> tuple[Any, jax.Array]:
    rows = {k: jnp.asarray(batch[k]) for k in keys}
    n = rows[keys[0]].shape[0]
    weights = jnp.asarray(batch["weights"], jnp.float32) if "weights" in batch else jnp.ones(n, jnp.float32)
    mask = trainable if trainable is not None else jax.tree.map(lambda _: True, params)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

    def body(acc, xs):
      row, w = xs
      g = grad_one(params, row)
      return jax.tree.map(lambda a, gi, t: a + w * jnp.square(gi.astype(jnp.float32)) if t else a,
                          acc, g, mask), None

    acc, _ = jax.lax.scan(body, zeros, (rows, weights))
    return acc, jnp.sum(weights)

  return fisher_sum


def fisher_diagonal(fisher_fn: FisherFn, params: Any, batches: Iterable[Mapping[str, Any]]) -> Any:
  """The mean over all real examples of ``batches`` of the squared per-example log-likelihood gradients.

  Raises:
    ValueError: when the batches hold no real example.
  """
  total, count = None, 0.0
  for batch in batches:
    s, n = fisher_fn(params, batch)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    count += float(n)
  if total is None or count <= 0:
    raise ValueError("EWC needs at least one calibration example of the finished task to measure its Fisher")
  return jax.tree.map(lambda x: x / count, total)


@jax.jit
def _combine(state: EwcState, fisher: Any, params: Any, decay: jax.Array) -> EwcState:
  f_old = jax.tree.map(lambda f: decay * f, state.fisher)
  theta = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  f_sum = jax.tree.map(jnp.add, f_old, fisher)
  # Weighted mean of the two anchors; where nothing has weight yet the new weights are as good as any.
  anchor = jax.tree.map(lambda fo, a, fn, t, f: jnp.where(f > 0, (fo * a + fn * t) / jnp.where(f > 0, f, 1.0), t),
                        f_old, state.anchor, fisher, theta, f_sum)
  # sum_k w_k (x - m_k)^2 = W (x - m)^2 + sum_k w_k (m_k - m)^2: the second part goes into the offset.
  rest = jax.tree.map(lambda fo, a, fn, t, m: jnp.sum(fo * jnp.square(a - m) + fn * jnp.square(t - m)),
                      f_old, state.anchor, fisher, theta, anchor)
  return EwcState(f_sum, anchor, decay * state.offset + sum(jax.tree.leaves(rest)))


def consolidate(state: EwcState, fisher: Any, params: Any, *, decay: float = 1.0) -> EwcState:
  """Adds the finished task's penalty ``sum_i fisher_i (theta_i - params_i)^2`` to ``state`` (older tasks scaled by
  ``decay``; 1 keeps the exact sum)."""
  if not 0.0 <= decay <= 1.0:
    raise ValueError(f"ewc decay must lie in [0, 1], got {decay}")
  return _combine(state, fisher, params, jnp.asarray(decay, jnp.float32))


def penalty(params: Any, state: EwcState, lam: float | jax.Array) -> jax.Array:
  """``lam / 2 * (sum_i F_i (theta_i - anchor_i)^2 + offset)``: add it to the task loss (jittable)."""
  quad = sum(jnp.sum(f * jnp.square(p.astype(jnp.float32) - a))
             for f, a, p in zip(jax.tree.leaves(state.fisher), jax.tree.leaves(state.anchor), jax.tree.leaves(params)))
  return 0.5 * lam * (quad + state.offset)
