"""Phase 3c, evaluate a stage: the invariant over the task just trained, and one row of R.

Every task of the stream is evaluated (also those not trained yet, for FWT); ``evaluate_initial`` gives the row of
the model before any training (FWT's baseline). Each evaluation also gives the option rate per task (answers that
are one of the task's labels) and writes every prediction to ``predictions/<row>.jsonl`` in the run directory
(process 0). The watchdog does not time evaluation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import clsvd_jax as cj
from clsvd_jax import scheduler as sched_lib
from clsvd_jax.train import evaluate as eval_lib
from clsvd_jax.train import metrics as metrics_lib
from clsvd_jax.train import outputs
from clsvd_jax.train.run_state import RunState, TrainState

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext


def evaluate_initial(ctx: RunContext, state: RunState, arrays: TrainState) -> None:
  """Accuracy of the model before training: ``state.baseline``."""
  acc, correct, _, rates = _accuracies(ctx, state, arrays.params, "eval initial", None)
  state.baseline, state.baseline_counts, state.baseline_option_rate = acc, correct, rates
  ctx.say("initial accuracy: " + ", ".join(f"{n}={100 * a:.1f}" for n, a in zip(ctx.prepared.names, acc)))


def evaluate_stage(ctx: RunContext, state: RunState, arrays: TrainState) -> None:
  """The invariant over stage ``state.stage`` and its row of R; moves the run to the next stage's boundary."""
  si, names = state.stage, ctx.prepared.names
  state.invariant.append(_invariant(ctx, state, arrays))
  name = ctx.stage_name(si)
  acc, correct, total, rates = _accuracies(ctx, state, arrays.params, f"eval after {name}", name)
  state.R.append(acc)
  state.option_rates.append(rates)
  state.counts.append(correct)
  state.totals = total
  ctx.say(f"after {name}: " + ", ".join(f"{n}={100 * a:.1f}" for n, a in zip(names, acc)))
  for n, a in zip(names, acc):
    ctx.writer.scalar(f"eval/{n}", a, si)
  state.next_stage()


def _invariant(ctx: RunContext, state: RunState, arrays: TrainState) -> dict[str, Any]:
  """``||U^T dW|| / ||dW||`` and ``||dW V|| / ||dW||`` of every constrained matrix over the task (or nothing)."""
  if not (ctx.config.eval.invariant_check and ctx.scheduler is not None):
    return {}
  subs = {path: s for path, s in cj.flatten_with_paths(cj.get_subspaces(arrays.opt_state),
                                                         is_leaf=sched_lib._is_node).items()
          if isinstance(s, cj.Subspace)}
  return metrics_lib.invariant_ratios(arrays.anchor, cj.flatten_with_paths(arrays.params), subs, steps=state.step)


def _accuracies(ctx: RunContext, state: RunState, params: Any, desc: str, row: str | None
                ) -> tuple[list[float], list[int], list[int], list[float | None]]:
  """Accuracy, correct answers, totals and option rates per task; the predictions go to the row's file (row None:
  the model before training)."""
  p = ctx.prepared
  e = ctx.config.eval
  t0 = time.perf_counter()
  with ctx.watchdog.pause(desc):
    res = eval_lib.evaluate_all(p.model, params, p.eval_splits, p.tokenizer, p.info, progress_desc=desc,
                                batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, names=p.names,
                                show_progress=ctx.config.training.progress and ctx.main, labels=p.labels or None)
  state.eval_seconds += time.perf_counter() - t0
  if ctx.main:
    outputs.write_predictions(ctx.run_dir, row, [rec for r in res for rec in r.records()])
  return ([r.accuracy for r in res], [r.correct for r in res], [r.total for r in res],
          [r.option_rate for r in res])
