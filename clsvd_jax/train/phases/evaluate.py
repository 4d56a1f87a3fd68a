"""Phase 3c, evaluate a stage: the invariant over the task just trained, and one row of R.

Every task of the stream is evaluated (also those not trained yet, for FWT); ``evaluate_initial`` gives the row of
the model before any training (FWT's baseline). Each evaluation also gives the option rate per task (answers that
are one of the task's labels), the rank-classification accuracy of every task with label options (``R_rank``: the
label the model finds likeliest, whatever it generates), and writes every prediction to
``predictions/<row>.jsonl`` in the run directory (process 0). The method decides which parameters are evaluated
and how a row is put together (``hooks.MethodHooks.eval_params`` / ``evaluate_row``). The watchdog does not time
evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import clsvd_jax as cj
from clsvd_jax._src import subspace as subspace_lib
from clsvd_jax.train import evaluate as eval_lib
from clsvd_jax.train import metrics as metrics_lib
from clsvd_jax.train import outputs
from clsvd_jax.train import rank_classification as rank_lib
from clsvd_jax.train.hooks import Row
from clsvd_jax.train.resources import merge_peaks, peak_memory
from clsvd_jax.train.run_state import RunState, TrainState

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext


def evaluate_initial(ctx: RunContext, state: RunState, arrays: TrainState) -> None:
  """Accuracy of the model before training: ``state.baseline``."""
  params = ctx.hooks.eval_params(arrays) if ctx.hooks is not None else arrays.params
  row = score_tasks(ctx, state, params, None, "eval initial", None)
  state.baseline, state.baseline_counts, state.baseline_option_rate = row.accuracy, row.correct, row.option_rate
  state.baseline_rank = row.rank
  ctx.say("initial accuracy: " + _describe(ctx, row))


def evaluate_stage(ctx: RunContext, state: RunState, arrays: TrainState) -> None:
  """The invariant over stage ``state.stage`` and its row of R; moves the run to the next stage's boundary."""
  si, names = state.stage, ctx.prepared.names
  state.invariant.append(_invariant(ctx, state, arrays))
  name = ctx.stage_name(si)
  score = lambda params, tasks, desc, row: score_tasks(ctx, state, params, tasks, desc, row)
  if ctx.hooks is not None:
    row = ctx.hooks.evaluate_row(ctx, state, arrays, score)
  else:
    row = score(arrays.params, None, f"eval after {name}", name)
  state.R.append(row.accuracy)
  state.option_rates.append(row.option_rate)
  state.counts.append(row.correct)
  state.R_rank.append(row.rank)
  state.totals = row.total
  ctx.say(f"after {name}: " + _describe(ctx, row))
  for n, a, r in zip(names, row.accuracy, row.rank):
    ctx.writer.scalar(f"eval/{n}", a, si)
    if r is not None:
      ctx.writer.scalar(f"eval_rank/{n}", r, si)
  state.peak_memory = merge_peaks(state.peak_memory, peak_memory())
  state.next_stage()


def _describe(ctx: RunContext, row: Row) -> str:
  """``dbpedia=40.0 (rank 61.0), amazon=...``."""
  return ", ".join(f"{n}={100 * a:.1f}" + (f" (rank {100 * r:.1f})" if r is not None else "")
                   for n, a, r in zip(ctx.prepared.names, row.accuracy, row.rank))


def _invariant(ctx: RunContext, state: RunState, arrays: TrainState) -> dict[str, Any]:
  """``||U^T dW|| / ||dW||`` and ``||dW V|| / ||dW||`` of every constrained matrix over the task (or nothing)."""
  if not (ctx.config.eval.invariant_check and ctx.scheduler is not None):
    return {}
  subs = subspace_lib.subspaces_by_path(cj.get_subspaces(arrays.opt_state))
  return metrics_lib.invariant_ratios(arrays.anchor, cj.flatten_with_paths(arrays.params), subs, steps=state.step)


def score_tasks(ctx: RunContext, state: RunState, params: Any, tasks: Sequence[int] | None, desc: str,
                row: str | None) -> Row:
  """Exact match, option rate and rank classification of ``params`` on the tasks ``tasks`` (None: all); the
  predictions go to the row's file (row None: the model before training). Tasks not scored are None."""
  p = ctx.prepared
  e = ctx.config.eval
  n = len(p.names)
  chosen = list(range(n)) if tasks is None else sorted(tasks)
  labels = p.labels or [None] * n
  t0 = time.perf_counter()
  with ctx.watchdog.pause(desc):
    res = eval_lib.evaluate_all(p.model, params, [p.eval_splits[j] for j in chosen], p.tokenizer, p.info,
                                progress_desc=desc, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                names=[p.names[j] for j in chosen], show_progress=ctx.config.training.progress
                                and ctx.main, labels=[labels[j] for j in chosen])
    ranks = rank_accuracies(ctx, params, chosen)
  state.eval_seconds += time.perf_counter() - t0
  if ctx.main:
    outputs.write_predictions(ctx.run_dir, row, [rec for r in res for rec in r.records()])
  out = Row([None] * n, [None] * n, [None] * n, [None] * n, [None] * n)
  for j, r in zip(chosen, res):
    out.accuracy[j], out.correct[j], out.total[j], out.option_rate[j] = r.accuracy, r.correct, r.total, r.option_rate
    out.rank[j] = ranks.get(j)
  return out


def rank_accuracies(ctx: RunContext, params: Any, tasks: Sequence[int]) -> dict[int, float]:
  """Rank-classification accuracy of ``params`` on each of ``tasks`` that has label options."""
  p = ctx.prepared
  if ctx.scorer is None:
    return {}
  out = {}
  for j in tasks:
    options = p.options[j] if j < len(p.options) else None
    if options is not None:
      out[j] = rank_lib.rank_classify_split(ctx.scorer, params, p.eval_splits[j], options, p.info,
                                            batch_size=ctx.config.eval.batch_size).accuracy
  return out
