"""The state of a continual-learning run: where it stands (``RunState``) and its arrays (``TrainState``).

A run walks its stages (one task each, or every task at once for ``mtl``), and each stage goes through three
phases in order: ``boundary`` (protect subspaces), ``train`` (the optimizer steps) and ``eval`` (one row of R).
``RunState`` says which stage and phase the run is in and holds everything measured so far; it round-trips through
JSON (``to_dict`` / ``from_dict``) as the ``run`` entry of every checkpoint's ``meta.json``, so a resumed run
continues from exactly where the checkpoint was written. ``TrainState`` holds the arrays of that checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

Phase = Literal["boundary", "train", "eval"]
PHASES: tuple[Phase, ...] = ("boundary", "train", "eval")


class TrainState(NamedTuple):
  """The arrays of a run (what Orbax saves).

  Attributes:
    params: the model's parameters (nested dict).
    opt_state: the optimizer state, including the protected subspaces.
    anchor: ``{path: W}`` float32 copies of the constrained matrices at the start of the current task (the
      reference of the invariant check); scalar placeholders when the check is off or no task has started.
    rng: the run's PRNG key data.
    method: the method's arrays (``hooks.MethodHooks.init_arrays``, e.g. EWC's Fisher and anchor); None: none.
  """

  params: Any
  opt_state: Any
  anchor: Any
  rng: Any
  method: Any = None

  def to_tree(self) -> dict[str, Any]:
    """The checkpoint layout (``{"params", "opt_state", "anchor", "rng", "method"}``)."""
    return self._asdict()

  @classmethod
  def from_tree(cls, tree: Mapping[str, Any]) -> TrainState:
    # A method without arrays stores none: the restored tree may lack the entry.
    return cls(**{k: tree.get(k) for k in cls._fields})


def loss_window(total_steps: int) -> int:
  """Steps at each end of a task whose mean loss ``TaskStats`` keeps: a tenth of the task, at least one."""
  return max(1, total_steps // 10)


@dataclasses.dataclass
class TaskStats:
  """What the run measures over the task in progress, kept in the checkpoint so a task resumed mid-way reports
  what an uninterrupted one does.

  Attributes:
    head_sum, head_count: the loss summed over the first ``loss_window`` steps of the task, and their number.
    tail_sum, tail_count: the same over the last ``loss_window`` steps (the tail mean is the task's
      ``train_loss``).
    param_norm: the global norm of the parameters at the start of the task.
    max_update_norm: the largest global norm of one step's update so far.
  """

  head_sum: float = 0.0
  head_count: int = 0
  tail_sum: float = 0.0
  tail_count: int = 0
  param_norm: float = 0.0
  max_update_norm: float = 0.0

  def add(self, step: int, total_steps: int, loss: float, update_norm: float) -> None:
    """Counts 0-based optimizer step ``step`` of a task of ``total_steps`` steps."""
    w = loss_window(total_steps)
    if step < w:
      self.head_sum += loss
      self.head_count += 1
    if step >= total_steps - w:
      self.tail_sum += loss
      self.tail_count += 1
    self.max_update_norm = max(self.max_update_norm, update_norm)

  @property
  def head(self) -> float | None:
    return self.head_sum / self.head_count if self.head_count else None

  @property
  def tail(self) -> float | None:
    return self.tail_sum / self.tail_count if self.tail_count else None


# How far the loss must rise over a task to count as diverging: noise and stagnation (a task whose protected
# directions leave little room, new label words) move the tail a few percent, a blow-up multiplies it.
LOSS_RISE = 1.5


def divergence(stats: TaskStats, vocab_size: int | None) -> str | None:
  """Why a finished task counts as diverged, or None. A task diverged when either

  1. one optimizer step changed the parameters by more than their whole norm at the start of the task
     (``max_update_norm > param_norm``): the weights were overwritten, not trained. AdamW moves each weight by
     about ``lr`` per step, so a real run stays at ``lr / (typical weight)``, far below 1; a learning rate far
     too large with clipping on (which keeps every value finite) gets there at its first step; or
  2. the loss blew up: the mean loss of the last tenth of the steps is more than ``LOSS_RISE`` (1.5) times the
     mean of the first tenth, and above ``ln(vocab_size)``, the cross entropy of giving every token of the
     vocabulary the same probability (a model worse than a uniform guess). A task that learns slowly, or not at
     all, stays near its starting loss and is not called diverged.
  """
  if stats.param_norm > 0 and stats.max_update_norm > stats.param_norm:
    return (f"one step moved the parameters by {stats.max_update_norm:.3g}, more than their norm "
            f"{stats.param_norm:.3g} at the start of the task")
  head, tail = stats.head, stats.tail
  if head is None or tail is None:
    return None
  chance = math.log(vocab_size) if vocab_size else 0.0
  if tail > LOSS_RISE * head and tail > chance:
    return (f"the mean loss rose from {head:.3f} (first tenth of the steps) to {tail:.3f} (last tenth), more than "
            f"{LOSS_RISE:g} times, and above chance (ln {vocab_size} = {chance:.2f})")
  return None


@dataclasses.dataclass
class RunState:
  """Where a run stands and what it measured (the ``run`` entry of ``meta.json``).

  Attributes:
    config_hash: what must not change between a run and its resume (``context.config_hash``).
    stage: index of the stage in progress; the number of stages when the run is finished.
    phase: the phase of ``stage`` that runs next.
    step: optimizer steps done in the current stage.
    global_step: optimizer steps done in the whole run (names the checkpoints).
    position: the data position of the next training batch of the stage (``BatchIterator.position``).
    R: accuracies, one row per finished stage, one column per task.
    counts: correct answers per row and task.
    totals: evaluation examples per task.
    baseline, baseline_counts: accuracies / correct answers of the model before training (FWT's baseline).
    option_rates: per finished stage and task, the share of answers that are one of the task's labels (None for
      a free-form task).
    baseline_option_rate: the same for the model before training.
    R_rank: per finished stage and task, the rank-classification accuracy (None for a task without labels).
    baseline_rank: the same for the model before training.
    method_state: the method's JSON state (``hooks.MethodHooks``; e.g. the replay memory).
    invariant: per finished stage, ``{path: ratios}`` of the invariant check.
    losses: per finished stage, the mean training loss over its last tenth of steps.
    task_stats: what the stage in progress measured so far (``TaskStats``).
    diverged: names of the stages that diverged (``run_state.divergence``).
    tokens: target tokens trained on (the loss's denominator).
    seen_tokens: input + target tokens trained on (what throughput figures count).
    train_seconds: wall time of the training phases (fetch to fetch, so it includes waiting on the device).
    eval_seconds: wall time of the evaluations.
    boundary_seconds: wall time of the task boundaries.
    peak_memory: the largest ``resources.peak_memory`` readings of the processes that ran it (bytes).
  """

  config_hash: str
  stage: int = 0
  phase: Phase = "boundary"
  step: int = 0
  global_step: int = 0
  position: dict[str, int] | None = None
  R: list[list[float]] = dataclasses.field(default_factory=list)
  counts: list[list[int]] = dataclasses.field(default_factory=list)
  totals: list[int] | None = None
  baseline: list[float] | None = None
  baseline_counts: list[int] | None = None
  option_rates: list[list[float | None]] = dataclasses.field(default_factory=list)
  baseline_option_rate: list[float | None] | None = None
  R_rank: list[list[float | None]] = dataclasses.field(default_factory=list)
  baseline_rank: list[float | None] | None = None
  method_state: dict[str, Any] = dataclasses.field(default_factory=dict)
  invariant: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  losses: list[float | None] = dataclasses.field(default_factory=list)
  task_stats: TaskStats = dataclasses.field(default_factory=TaskStats)
  diverged: list[str] = dataclasses.field(default_factory=list)
  tokens: float = 0.0
  seen_tokens: float = 0.0
  train_seconds: float = 0.0
  eval_seconds: float = 0.0
  boundary_seconds: float = 0.0
  peak_memory: dict[str, int | None] = dataclasses.field(default_factory=dict)

  def finished(self, num_stages: int) -> bool:
    return self.stage >= num_stages

  def next_stage(self) -> None:
    """Moves to the boundary of the following stage."""
    self.stage += 1
    self.phase = "boundary"
    self.step = 0
    self.position = None
    self.task_stats = TaskStats()

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict that ``from_dict`` reads back to an equal state."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> RunState:
    """Reads ``to_dict`` output (keys this version does not know are refused; missing ones take defaults, so
    checkpoints of older versions, without the newer fields, still resume).

    Raises:
      ValueError: on an unknown key or phase.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"run state: unknown keys {unknown}")
    kwargs = dict(d)
    if isinstance(kwargs.get("task_stats"), Mapping):
      kwargs["task_stats"] = TaskStats(**kwargs["task_stats"])
    if kwargs.get("phase", "boundary") not in PHASES:
      raise ValueError(f"run state: phase {kwargs['phase']!r} is not one of {PHASES}")
    return cls(**kwargs)
