"""``method: ewc``: elastic weight consolidation through the runner.

At the boundary before task t the diagonal Fisher of task t-1 is measured at the current weights on
``ewc.fisher_batches`` batches of its training data (one backward pass per example) and folded into the penalty's
state (``methods.ewc.consolidate``: one Fisher, one anchor, one offset for all finished tasks). The train step adds
``ewc.lam / 2 * sum_i F_i (theta_i - anchor_i)^2 + offset`` to the loss once per step; the state is the step's
``aux`` argument (it changes at boundaries without recompiling) and the checkpoint's ``method`` arrays (laid out as
the parameters), so a resumed run restores it bitwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax

from clsvd_jax.data import BatchIterator
from clsvd_jax.methods import ewc as ewc_lib
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.hooks import MethodHooks, commit

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext
  from clsvd_jax.train.layout import Layout
  from clsvd_jax.train.run_state import RunState, TrainState

# Offset of the seeds of the Fisher batches (apart from the training order and the scheduler's calibration).
_FISHER_SEED = 3000


class EwcHooks(MethodHooks):
  """Fisher at the boundary, quadratic penalty in the step."""

  def __init__(self, config: Any, prepared: Any, apply_fn: Any):
    super().__init__(config, prepared, apply_fn)
    lam = float(config.ewc.lam)
    self.loss_terms = step_lib.LossTerms(penalty=lambda params, aux, opt_state: ewc_lib.penalty(params, aux, lam))
    self._fisher_fn = None

  def init_arrays(self, params: Any, layout: Layout) -> ewc_lib.EwcState:
    state = ewc_lib.init_state(params)
    offset = layout.put_replicated(state.offset)
    return ewc_lib.EwcState(commit(state.fisher, layout), commit(state.anchor, layout), offset)

  def step_input(self, arrays: TrainState) -> ewc_lib.EwcState:
    return arrays.method

  def fisher_fn(self, params: Any) -> ewc_lib.FisherFn:
    """The jitted per-example Fisher sum (built once; frozen parameters get none)."""
    if self._fisher_fn is None:
      labels = step_lib.policy_of_run(self.config).policy.labels(params)
      self._fisher_fn = ewc_lib.make_fisher_fn(self.apply_fn, kind=self.prepared.kind,
                                               trainable=jax.tree.map(lambda a: a != "freeze", labels))
    return self._fisher_fn

  def before_stage(self, ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
    si = state.stage
    if si == 0:
      return arrays
    cfg, p = ctx.config, ctx.prepared
    batches = []
    for task in ctx.stages[si - 1]:
      split = p.train_splits[task]
      size = min(cfg.ewc.fisher_batch_size or cfg.training.batch_size, len(split))
      it = BatchIterator(split, p.info, batch_size=size, seed=cfg.training.seed + _FISHER_SEED + si, num_epochs=None)
      batches += [it.batch_at(0, s) for s in range(min(cfg.ewc.fisher_batches, it.steps_per_epoch))]
    ctx.watchdog.beat(f"the Fisher of {ctx.stage_name(si - 1)} before {ctx.stage_label(si)}")
    fisher = ewc_lib.fisher_diagonal(self.fisher_fn(arrays.params), arrays.params, batches)
    method = ewc_lib.consolidate(arrays.method, fisher, arrays.params, decay=cfg.ewc.decay)
    examples = sum(int(b["weights"].sum()) for b in batches)
    ctx.say(f"{ctx.stage_label(si)}: EWC Fisher of {ctx.stage_name(si - 1)} from {examples} examples "
            f"(lambda {cfg.ewc.lam:g})")
    return arrays._replace(method=method)
