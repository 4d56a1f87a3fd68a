"""Phase 4, write: the results of a finished run (``results.json``, ``R.csv``, the plots) and its tables.

Only process 0 writes; every process returns the same results dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from clsvd_jax.train import metrics as metrics_lib
from clsvd_jax.train import model_io, outputs
from clsvd_jax.train.resources import merge_peaks, peak_memory
from clsvd_jax.train.run_state import RunState

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext


def write(ctx: RunContext, state: RunState) -> dict[str, Any]:
  """Writes the outputs of the finished run and prints its R table and summary; returns the results."""
  res = results(ctx, state)
  if ctx.main:
    outputs.write_outputs(res, ctx.run_dir)
  ctx.say(outputs.format_r_table(res, title=f"[{ctx.config.method}] R (accuracy %)"))
  options = outputs.format_option_table(res, title=f"[{ctx.config.method}] option rate (% of answers that are a "
                                                   "label)")
  if options:
    ctx.say(options)
  ranks = outputs.format_rank_table(res, title=f"[{ctx.config.method}] rank classification (accuracy %: the likeliest "
                                               "label option)")
  if ranks:
    ctx.say(ranks)
  ctx.say(outputs.format_summary(res))
  if res["diverged"]:
    ctx.say(f"warning: training diverged on {', '.join(res['diverged'])} (see the warnings above)")
  return res


def results(ctx: RunContext, state: RunState) -> dict[str, Any]:
  """The results dict of a finished run (what ``results.json`` holds)."""
  config, p = ctx.config, ctx.prepared
  r = state.R
  totals = state.totals or [len(s) for s in p.eval_splits]
  summary = metrics_lib.summarize(r, baseline=state.baseline, correct_last=state.counts[-1], total=totals)
  sched = ctx.scheduler.to_dict() if ctx.scheduler is not None else {"records": []}
  extras = ctx.hooks.results(state) if ctx.hooks is not None else {}
  return {
    "name": config.name or config.method,
    "method": config.method,
    "tasks": p.names,
    "row_names": [ctx.stage_name(si) for si in range(ctx.num_stages)],
    "R": r,
    "R_initial": state.baseline,
    **summary,
    "correct": state.counts,
    "eval_sizes": totals,
    "ranks": [rec["ranks"] for rec in sched["records"]],
    "invariant": state.invariant,
    "invariant_max": metrics_lib.invariant_max(state.invariant, config.osft.sides),
    "scheduler": sched,
    "param_policy_counts": dict(ctx.policy_counts),
    "param_policy": dict(ctx.policy),
    "precision": {"load_dtype": config.model.dtype, "param_dtype": np.dtype(model_io.MASTER_DTYPE).name,
                  "compute_dtype": "bfloat16" if config.training.bf16_compute else "float32"},
    "option_rate": state.option_rates,
    "option_rate_initial": state.baseline_option_rate,
    "R_rank": state.R_rank,
    "R_rank_initial": state.baseline_rank,
    "rank_metrics": metrics_lib.summarize_partial(state.R_rank, state.baseline_rank),
    "predictions": ([outputs.prediction_file(None)] if state.baseline is not None else [])
                   + [outputs.prediction_file(ctx.stage_name(si)) for si in range(len(r))],
    "train_loss": state.losses,
    "diverged": state.diverged,
    "global_steps": state.global_step,
    "train_tokens": state.tokens,
    "train_seen_tokens": state.seen_tokens,
    "train_seconds": state.train_seconds,
    "eval_seconds": state.eval_seconds,
    "boundary_seconds": state.boundary_seconds,
    "peak_memory": merge_peaks(state.peak_memory, peak_memory()),
    "tokens_per_second": state.seen_tokens / max(state.train_seconds, 1e-9),
    "target_tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
    "model_config": model_io.model_config_dict(p.model),
    "config": config.to_dict(),
  } | extras
