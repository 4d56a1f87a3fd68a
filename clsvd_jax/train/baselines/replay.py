"""``method: replay``: sequential fine-tuning with a memory of examples of the finished tasks.

At the boundary before task t the memory takes ``replay.memory_per_task`` examples of task t-1's training split
(``methods.replay.remember``: a draw that depends only on the seed and the task, so rerunning a boundary after a
resume draws the same); every batch of task t then holds ``round(replay.ratio * batch_size)`` memory rows
(``ReplayBatchIterator``). The memory is a list of (task, example) pairs, saved as JSON in every checkpoint
(``RunState.method_state``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any

from clsvd_jax.methods import replay as replay_lib
from clsvd_jax.train.hooks import MethodHooks

if TYPE_CHECKING:
  from clsvd_jax.data import BatchIterator
  from clsvd_jax.train.context import RunContext
  from clsvd_jax.train.run_state import RunState, TrainState


def memory_of(state: RunState) -> replay_lib.ReplayMemory:
  """The replay memory as the run state holds it (empty before the second task)."""
  return replay_lib.ReplayMemory.from_dict(state.method_state.get("memory"))


class ReplayHooks(MethodHooks):
  """Remember at the boundary, mix in the training batches."""

  def __init__(self, config: Any, prepared: Any, apply_fn: Any):
    super().__init__(config, prepared, apply_fn)
    self.options = replay_lib.ReplayOptions(**dataclasses.asdict(config.replay))

  def before_stage(self, ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
    si = state.stage
    if si == 0:
      return arrays
    memory = memory_of(state)
    for task in ctx.stages[si - 1]:
      memory = replay_lib.remember(memory, task, ctx.prepared.train_splits[task], self.options,
                                   seed=ctx.config.training.seed)
    state.method_state = {"memory": memory.to_dict()}
    rows = replay_lib.memory_rows(self.options.ratio, ctx.config.training.batch_size, len(memory))
    ctx.say(f"{ctx.stage_label(si)}: replay memory holds {len(memory)} examples of {si} finished task(s); {rows} of "
            f"every {ctx.config.training.batch_size} rows come from it")
    return arrays

  def train_batches(self, ctx: RunContext, state: RunState) -> BatchIterator:
    p, si, tcfg = ctx.prepared, state.stage, ctx.config.training
    (task,) = ctx.stages[si]
    index, count = ctx.layout.host_split
    return replay_lib.ReplayBatchIterator(
        p.train_splits[task], memory_of(state).examples(p.train_splits), p.info, batch_size=tcfg.batch_size,
        ratio=self.options.ratio, seed=tcfg.seed + si, num_epochs=None, position=state.position,
        process_index=index, process_count=count)

  def results(self, state: RunState) -> dict[str, Any]:
    memory = memory_of(state)
    counts = Counter(memory.tasks)
    names = self.prepared.names
    return {"replay_memory": {"size": len(memory), "per_task": {names[t]: counts[t] for t in sorted(counts)}}}
