"""Phase 3a, the task boundary before a stage: protect subspaces, reset moments, and remember the weights.

For a constrained method, the task scheduler measures block importance on calibration batches, computes the
protected ranks, accumulates the subspaces (from the weights, or from the finished task's input activations) and
installs them in the optimizer state. Adam's moments are reset when ``osft.reset_moments`` says so. The constrained
matrices are copied (float32) as the reference of the invariant check over the coming task. Then the method's own
boundary action runs (``hooks.MethodHooks.before_stage``: replay remembers the finished task, EWC measures its
Fisher, O-LoRA moves to a new adapter, pertask goes back to the initial weights).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

import clsvd_jax as cj
from clsvd_jax.config import ConfigError
from clsvd_jax.data import BatchIterator, EncodedSplit
from clsvd_jax.data.batching import Position
from clsvd_jax.train import covariance, model_io
from clsvd_jax.train import scheduler as sched_lib
from clsvd_jax.train.run_state import RunState, TrainState

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext


@jax.jit
def copy_f32(tree: Any) -> Any:
  """A fresh float32 copy in the arrays' own layout (the train step donates the weights' buffers)."""
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def boundary(ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
  """Runs the boundary before stage ``state.stage`` and moves the run to its training phase.

  Args:
    ctx: the run's context.
    state: the run state (phase ``boundary``); left at phase ``train``, step 0.
    arrays: the run's arrays.

  Returns:
    The arrays with the new subspaces (and moments, and invariant reference) installed.
  """
  si = state.stage
  cfg = ctx.config
  t0 = time.perf_counter()
  opt_state = arrays.opt_state
  if ctx.scheduler is not None:
    inputs = calibration_inputs(ctx, arrays.params, si)
    opt_state = ctx.scheduler.before_task(si, arrays.params, opt_state, inputs)
    rec = ctx.scheduler.records[-1]
    if rec["protected"]:
      mean_ratio = np.mean([np.mean(v) for v in rec["rank_ratio"].values()]) if rec["rank_ratio"] else 0.0
      ctx.say(f"{ctx.stage_label(si)}: protected {100 * mean_ratio:.1f}% of the directions "
              f"(policy {rec['policy']}, basis {rec['basis_source']})")
  if cfg.osft.reset_moments and si > 0:
    fresh = sched_lib.reset_moments(ctx.tx, arrays.params, opt_state) if ctx.method.constrained else \
        ctx.tx.init(arrays.params)
    opt_state = ctx.layout.put_opt_state(fresh)
  anchor = arrays.anchor
  if cfg.eval.invariant_check and ctx.scheduler is not None:
    flat = cj.flatten_with_paths(arrays.params)
    anchor = copy_f32({path: flat[path] for path in ctx.shapes})
  arrays = arrays._replace(opt_state=opt_state, anchor=anchor)
  if ctx.hooks is not None:
    arrays = ctx.hooks.before_stage(ctx, state, arrays)
  state.phase = "train"
  state.step = 0
  state.position = Position().to_dict()
  state.boundary_seconds += time.perf_counter() - t0
  ctx.watchdog.beat()
  return arrays


def calibration_inputs(ctx: RunContext, params: Any, si: int) -> sched_lib.BoundaryInputs:
  """Calibration measurements for the boundary before stage ``si`` (current parameters)."""
  cfg, p = ctx.config, ctx.prepared
  o = cfg.osft
  size = o.calibration_batch_size or cfg.training.batch_size
  model_io.update_model(p.model, params)

  def batches_of(split: EncodedSplit, seed: int) -> list[dict[str, Any]]:
    cal = BatchIterator(split, p.info, batch_size=min(size, len(split)), seed=seed, num_epochs=None)
    n = min(o.calibration_batches, cal.steps_per_epoch)
    return [cal.batch_at(0, s) for s in range(n)]

  stages = ctx.stages
  source = stages[si][0] if (o.calibration_task == "new" or si == 0) else stages[si - 1][0]
  batches = batches_of(p.train_splits[source], cfg.training.seed + 1000 + si)
  covs = None
  if o.basis_source == "activations" and si > 0:
    prev = p.train_splits[stages[si - 1][0]]
    try:
      covs = covariance.matrix_input_covariances(p.model, batches_of(prev, cfg.training.seed + 2000 + si))
    except NotImplementedError as e:
      raise ConfigError(f"osft.basis_source: {e}") from None
  return sched_lib.BoundaryInputs(
      hidden_states=lambda b: model_io.block_hidden_states(p.model, b),
      token_masks=model_io.token_mask_for_stack, importance_batches=batches, covariances=covs)
