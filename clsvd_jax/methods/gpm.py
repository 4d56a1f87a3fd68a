"""Gradient projection memory (GPM, Saha et al. 2021) as a preset of the core transform.

GPM keeps, for every layer, a basis of the input space its finished tasks used (the top directions of the layer
inputs' covariance, grown task after task until a fraction ``eps`` of each new task's input energy lies inside it)
and removes that span from every later gradient: ``G (I - V V^T)``. Then ``W x`` is unchanged for every input x in
the stored span, which is the whole point.

Everything it needs exists in the core: ``constrained(..., sides="right")`` applies ``G (I - V V^T)`` (to the
incoming gradient and again to the optimizer's final update, so Adam cannot leak into the span), the task
scheduler's ``activations`` basis source accumulates V from the finished tasks' input covariances
(``clsvd_jax.models.matrix_input_covariances``), and its ``energy`` rank policy extends the basis until it holds
``eps`` of the new covariance's energy, counting what the old basis already holds (GPM's criterion). This module only
fixes those choices, so a user can compare GPM with the two-sided weight or activation variants through one switch.

Differences from the paper: one threshold for all tasks (GPM raises it slightly per task in some experiments),
AdamW instead of SGD by default (exact all the same, through the final projection), and the scheduler also
computes a left basis that the right-sided projection never reads (it costs memory, not correctness).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

import clsvd_jax as cj
from clsvd_jax.config import OsftConfig, RankPolicyConfig


def gpm_config(eps: float = 0.97, *, base: OsftConfig | None = None, max_rank_ratio: float | None = None
               ) -> OsftConfig:
  """The ``osft`` section that makes the runner's constrained method GPM.

  Args:
    eps: energy threshold: after each task the basis holds at least this fraction of the task's input energy at
      every constrained matrix.
    base: other settings to keep (parameter policy, calibration batches, ``min_trainable``...); default
      ``OsftConfig()``.
    max_rank_ratio: cap of the protected fraction (sizes the bases); default ``base``'s.

  Returns:
    ``base`` with one-sided right projection, bases from input activations, the energy rank policy and protection
    from the second task on (the first task has no finished predecessor to take activations from).
  """
  if not 0.0 < eps <= 1.0:
    raise ValueError(f"gpm eps must lie in (0, 1], got {eps}")
  base = base or OsftConfig()
  return dataclasses.replace(
      base, sides="right", project_gradients=True, basis_source="activations", start_protecting_from=2,
      rank_policy=RankPolicyConfig(name="energy", eps=eps),
      max_rank_ratio=base.max_rank_ratio if max_rank_ratio is None else max_rank_ratio)


def gpm_optimizer(inner: optax.GradientTransformation, *, mask: Any = None, max_rank_ratio: float = 1.0
                  ) -> optax.GradientTransformationExtraArgs:
  """``inner`` (e.g. ``optax.sgd`` as in the paper, or AdamW) under GPM's projection ``G (I - V V^T)``.

  Args:
    inner: the optimizer.
    mask: which parameters get a subspace slot (``clsvd_jax.init_subspaces``); default every matrix.
    max_rank_ratio: the largest protected fraction the bases must hold.
  """
  return cj.constrained(inner, sides="right", project_gradients=True, mask=mask, max_rank_ratio=max_rank_ratio)
