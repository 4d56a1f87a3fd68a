"""``method: pertask``: one model per task, each trained from the initial weights on its own task only.

Every stage starts from a copy of the initial parameters with a fresh optimizer state (``PerTaskPlan``): the copy
is made when the run's context is built, from the model the config builds, so a resumed run restarts its tasks from
the same weights. A row of R costs one evaluation: the model just trained on its own task; the earlier tasks keep
their diagonal scores (their models no longer change) and the later ones the initial model's (which is why
``eval.initial`` must be on). The predictions file of a row holds the own task's answers only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clsvd_jax.config import ConfigError
from clsvd_jax.methods.pertask import PerTaskPlan
from clsvd_jax.train.hooks import MethodHooks, Row, Scorer, commit

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext
  from clsvd_jax.train.layout import Layout
  from clsvd_jax.train.run_state import RunState, TrainState


class PerTaskHooks(MethodHooks):
  """Restart from the initial weights at every boundary; assemble each row from one evaluation."""

  def __init__(self, config: Any, prepared: Any, apply_fn: Any):
    super().__init__(config, prepared, apply_fn)
    if not config.eval.initial:
      raise ConfigError("eval.initial: method pertask scores the tasks no model has been trained on yet with the "
                        "initial model; set eval.initial: true")
    self.plan = PerTaskPlan(len(prepared.names))
    self.initial: Any = None
    self.layout: Any = None

  def init_arrays(self, params: Any, layout: Layout) -> None:
    self.initial, self.layout = commit(params, layout), layout
    return None

  def before_stage(self, ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
    if state.stage == 0 or not self.plan.restarts_before(state.stage):
      return arrays
    params = commit(self.initial, self.layout)
    return arrays._replace(params=params, opt_state=ctx.layout.put_opt_state(ctx.tx.init(params)))

  def evaluate_row(self, ctx: RunContext, state: RunState, arrays: TrainState, score: Scorer) -> Row:
    si, name = state.stage, ctx.stage_name(state.stage)
    if state.baseline is None:
      raise RuntimeError("pertask: the initial evaluation is missing (eval.initial must be on)")
    own = score(self.eval_params(arrays), [si], f"eval after {name}", name)
    diagonal = lambda rows: [rows[j][j] for j in range(si)]
    assemble = lambda field, rows, initial: self.plan.assemble_row(si, field[si], diagonal(rows), initial)
    totals = [len(s) for s in ctx.prepared.eval_splits]
    return Row(accuracy=assemble(own.accuracy, state.R, state.baseline),
               correct=assemble(own.correct, state.counts, state.baseline_counts),
               total=[own.total[si] if j == si else totals[j] for j in range(len(totals))],
               option_rate=assemble(own.option_rate, state.option_rates, state.baseline_option_rate),
               rank=assemble(own.rank, state.R_rank, state.baseline_rank or [None] * len(totals)))
