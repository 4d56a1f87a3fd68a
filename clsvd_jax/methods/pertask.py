"""``pertask``: one model per task, each trained from the initial weights on its own task only.

It needs the task id at test time (route every example to its task's model), so it is an upper bound on retention,
not a continual learner. The runner needs two decisions from it:

1. Training: every stage starts from the INITIAL parameters with a fresh optimizer state
   (``PerTaskPlan.restarts_before``), so model i has seen task i and nothing else.
2. Evaluation, the row of R after stage i: task j is scored by the model that would answer it,
   * ``OWN`` (j = i): model i, just trained: the one evaluation this row needs;
   * ``KEPT`` (j < i): model j, which stopped changing after stage j, so its score is ``R[j][j]`` exactly and is
     copied rather than recomputed (saving T (T - 1) / 2 evaluations of the full matrix);
   * ``INITIAL`` (j > i): no model for task j exists yet; a router would hand task j to the untrained initial
     model, whose scores are the initial row (measured once, before the first stage).

Hence BWT and FWT are 0 by construction (no model changes after its stage, none sees another task), forgetting too
whenever each model beats the initial one on its own task, and AA is the mean of the diagonal. Model j's weights
are the parameters saved at the end of stage j (the runner's boundary checkpoint; keep it, or export it, to
evaluate task j again later).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any


class Source(enum.Enum):
  """Which parameters score a task in one row of R."""

  OWN = "own"          # the model just trained (this stage's task)
  KEPT = "kept"        # an earlier task's model: its diagonal score, copied
  INITIAL = "initial"  # the initial model: its score from the initial evaluation


@dataclasses.dataclass(frozen=True)
class PerTaskPlan:
  """The evaluation and restart plan of ``pertask`` over a stream of ``num_tasks`` tasks (one stage per task)."""

  num_tasks: int

  def __post_init__(self):
    if self.num_tasks < 1:
      raise ValueError(f"pertask needs at least one task, got {self.num_tasks}")

  def restarts_before(self, stage: int) -> bool:
    """Every stage begins from the initial parameters and a fresh optimizer state."""
    self._check(stage)
    return True

  def sources(self, after: int) -> tuple[Source, ...]:
    """For each task, which parameters score it in the row after stage ``after``."""
    self._check(after)
    return tuple(Source.KEPT if j < after else Source.OWN if j == after else Source.INITIAL
                 for j in range(self.num_tasks))

  def tasks_to_evaluate(self, after: int, *, initial_known: bool) -> dict[Source, list[int]]:
    """The evaluations this row needs: model ``after`` on its own task, and the initial model on the later tasks
    unless the initial row was measured already (``initial_known``)."""
    src = self.sources(after)
    out = {Source.OWN: [after]}
    if not initial_known:
      out[Source.INITIAL] = [j for j, s in enumerate(src) if s is Source.INITIAL]
    return out

  def assemble_row(self, after: int, own: Any, diagonal: Sequence[Any], initial: Sequence[Any]) -> list[Any]:
    """The row after stage ``after`` from the values each source gives (accuracies, correct counts, ...).

    Args:
      after: the stage just finished.
      own: model ``after``'s value on its own task.
      diagonal: the values of the earlier rows' own tasks (``R[j][j]``, j < after).
      initial: the initial model's value on every task.

    Raises:
      ValueError: when ``diagonal`` or ``initial`` have the wrong length.
    """
    if len(diagonal) != after:
      raise ValueError(f"pertask row {after}: need the {after} earlier diagonal values, got {len(diagonal)}")
    if len(initial) != self.num_tasks:
      raise ValueError(f"pertask row {after}: need the initial value of all {self.num_tasks} tasks, got "
                       f"{len(initial)}")
    pick = {Source.OWN: lambda j: own, Source.KEPT: lambda j: diagonal[j], Source.INITIAL: lambda j: initial[j]}
    return [pick[s](j) for j, s in enumerate(self.sources(after))]

  def _check(self, stage: int) -> None:
    if not 0 <= stage < self.num_tasks:
      raise ValueError(f"pertask: stage {stage} outside the {self.num_tasks} tasks of the stream")
