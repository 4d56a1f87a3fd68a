"""Replay: a memory of N training examples per finished task, mixed into the batches of the tasks after it.

Three pieces:

* selection (jitted, seeded with ``jax.random``): ``select_reservoir`` draws a uniform N-subset of a finished
  task's training split; ``select_per_label`` draws N examples spread as evenly as the data allow over the labels
  (round robin over labels in random order, so label counts differ by at most one until a label runs out).
* ``ReplayMemory``: the chosen examples as ``(task, index)`` pairs into the runner's encoded training splits. Those
  splits are a deterministic function of the config, so the pairs identify the rows exactly; they are plain ints, so
  ``to_dict`` / ``from_dict`` (the checkpoint's JSON meta) round-trip bitwise.
* ``ReplayBatchIterator``: a ``BatchIterator`` whose global batch holds ``round(ratio * batch_size)`` memory rows
  and the rest from the current task (which keeps its own epoch order). The memory rows of a batch are a pure
  function of ``(seed, epoch, step)``, so a resumed run (same ``Position``) sees exactly the batches it had left.

Typical use at a task boundary and in the train phase::

  memory = remember(memory, task_index, train_splits[task_index], options, seed=config.training.seed)
  it = ReplayBatchIterator(train_splits[t], memory.examples(train_splits), info, batch_size=B,
                           ratio=options.ratio, seed=seed + t, position=saved_position)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from clsvd_jax.data.batching import BatchIterator
from clsvd_jax.data.tokenize import EncodedExample, EncodedSplit

STRATEGIES = ("reservoir", "per_label")


@dataclasses.dataclass(frozen=True)
class ReplayOptions:
  """The ``replay`` method's settings.

  Attributes:
    memory_per_task: examples kept from each finished task (all of them when its split is smaller).
    strategy: ``reservoir`` (a uniform subset: what reservoir sampling yields over a stream of known length, drawn in
      one shot) or ``per_label`` (balanced over the task's answers).
    ratio: share of every training batch taken from the memory once it holds anything, in [0, 1).
  """

  memory_per_task: int = 100
  strategy: Literal["reservoir", "per_label"] = "reservoir"
  ratio: float = 0.25

  def __post_init__(self):
    if self.memory_per_task < 0:
      raise ValueError(f"replay.memory_per_task must be >= 0, got {self.memory_per_task}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"replay.strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not 0.0 <= self.ratio < 1.0:
      raise ValueError(f"replay.ratio must lie in [0, 1) (some rows must come from the current task), got "
                       f"{self.ratio}")


# ---------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n", "size"))
def select_reservoir(key: jax.Array, n: int, size: int) -> jax.Array:
  """``min(size, n)`` distinct indices of ``range(n)``, uniformly at random, in ascending order."""
  return jnp.sort(jax.random.permutation(key, n)[:min(size, n)]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("size",))
def select_per_label(key: jax.Array, labels: jax.Array, size: int) -> jax.Array:
  """``min(size, n)`` distinct indices spread over the label ids ``labels`` (int ``[n]``), in ascending order.

  Every example gets its rank among the examples of its label (a random order within the label); taking the
  examples by rank, ties broken at random, fills the memory round by round: each label contributes one example per
  round until it runs out.
  """
  n = labels.shape[0]
  k_within, k_ties = jax.random.split(key)
  order = jnp.lexsort((jax.random.uniform(k_within, (n,)), labels))
  sorted_labels = labels[order]
  first_of_label = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) - first_of_label)
  picked = jnp.lexsort((jax.random.uniform(k_ties, (n,)), rank))[:min(size, n)]
  return jnp.sort(picked).astype(jnp.int32)


def label_ids(split: EncodedSplit) -> np.ndarray:
  """Integer ids of the examples' answers (sorted unique answer strings -> 0..L-1)."""
  answers = [e.target for e in split.examples]
  vocab = {a: i for i, a in enumerate(sorted(set(answers)))}
  return np.asarray([vocab[a] for a in answers], np.int32)


def select(options: ReplayOptions, split: EncodedSplit, key: jax.Array) -> np.ndarray:
  """The indices of ``split``'s examples that the memory keeps (ascending)."""
  n = len(split)
  if n == 0 or options.memory_per_task == 0:
    return np.zeros(0, np.int32)
  if options.strategy == "per_label":
    return np.asarray(select_per_label(key, jnp.asarray(label_ids(split)), options.memory_per_task))
  return np.asarray(select_reservoir(key, n, options.memory_per_task))


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplayMemory:
  """The remembered examples: ``(tasks[i], indices[i])`` is example ``indices[i]`` of task ``tasks[i]``'s training
  split. Immutable; ``add`` returns a new memory."""

  tasks: tuple[int, ...] = ()
  indices: tuple[int, ...] = ()

  def __post_init__(self):
    if len(self.tasks) != len(self.indices):
      raise ValueError(f"ReplayMemory: {len(self.tasks)} task ids but {len(self.indices)} indices")

  def __len__(self) -> int:
    return len(self.tasks)

  def add(self, task: int, indices: Sequence[int]) -> ReplayMemory:
    """This memory plus ``indices`` of task ``task`` (a task already remembered is replaced, so a boundary that
    runs twice, e.g. after a resume, does not store it twice)."""
    kept = [(t, i) for t, i in zip(self.tasks, self.indices) if t != task]
    kept += [(int(task), int(i)) for i in indices]
    return ReplayMemory(tuple(t for t, _ in kept), tuple(i for _, i in kept))

  def of_task(self, task: int) -> tuple[int, ...]:
    """The remembered indices of one task."""
    return tuple(i for t, i in zip(self.tasks, self.indices) if t == task)

  def examples(self, splits: Sequence[EncodedSplit]) -> list[EncodedExample]:
    """The remembered rows, read from the run's encoded training splits (one per task, stream order).

    Raises:
      ValueError: when a pair points outside the splits (a checkpoint of another stream or sample).
    """
    out = []
    for t, i in zip(self.tasks, self.indices):
      if not 0 <= t < len(splits) or not 0 <= i < len(splits[t]):
        raise ValueError(f"replay memory holds example {i} of task {t}, but the stream has {len(splits)} tasks"
                         f"{f' and task {t} has {len(splits[t])} training examples' if 0 <= t < len(splits) else ''}"
                         "; resume with the config the checkpoint was written with")
      out.append(splits[t].examples[i])
    return out

  def to_dict(self) -> dict[str, list[int]]:
    """JSON form (for the checkpoint's meta)."""
    return {"tasks": list(self.tasks), "indices": list(self.indices)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> ReplayMemory:
    if not d:
      return cls()
    return cls(tuple(int(t) for t in d["tasks"]), tuple(int(i) for i in d["indices"]))


def remember(memory: ReplayMemory, task: int, split: EncodedSplit, options: ReplayOptions, *,
             seed: int) -> ReplayMemory:
  """``memory`` plus the examples kept from finished task ``task`` (its training ``split``).

  The draw depends only on ``(seed, task)``, so rerunning a boundary reproduces it.
  """
  key = jax.random.fold_in(jax.random.key(seed), task)
  return memory.add(task, select(options, split, key).tolist())


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def memory_rows(ratio: float, batch_size: int, memory_size: int) -> int:
  """Rows of a global batch drawn from the memory: ``round(ratio * batch_size)`` once the memory holds anything,
  and always fewer than ``batch_size``."""
  if memory_size == 0:
    return 0
  return min(int(round(ratio * batch_size)), batch_size - 1)


class ReplayBatchIterator(BatchIterator):
  """A ``BatchIterator`` over the current task's split that fills part of every batch from a replay memory.

  An epoch walks the current task's examples once, ``batch_size - m`` at a time (``m = memory_rows(...)``), in
  the order ``permutation(seed, epoch)``; batch ``(epoch, step)`` adds ``m`` memory rows drawn by
  ``numpy.random.default_rng([seed, epoch, step, 1])`` (distinct within the batch when the memory holds ``m`` or
  more). Memory rows are real rows (weight 1, full loss mask): the loss is the mean over all target tokens of the
  batch, current and replayed alike.

  Args:
    data: the current task's encoded training split.
    memory: the remembered rows (``ReplayMemory.examples``), any tasks.
    info: special ids.
    batch_size: the global batch size.
    ratio: share of each batch from the memory.
    seed: shuffling and drawing seed.
    **kwargs: the other ``BatchIterator`` arguments (``num_epochs``, ``position``, host split, buckets...).
  """

  def __init__(self, data: EncodedSplit, memory: Sequence[EncodedExample], info: Any, *, batch_size: int,
               ratio: float, seed: int = 0, **kwargs: Any):
    self.memory = list(memory)
    if not 0.0 <= ratio < 1.0:
      raise ValueError(f"ReplayBatchIterator: ratio must lie in [0, 1), got {ratio}")
    self.memory_rows = memory_rows(ratio, batch_size, len(self.memory))
    super().__init__(data, info, batch_size=batch_size, seed=seed, **kwargs)

  @property
  def current_rows(self) -> int:
    """Rows of each global batch that come from the current task."""
    return self.batch_size - self.memory_rows

  @property
  def steps_per_epoch(self) -> int:
    n, per = len(self.data), self.current_rows
    return n // per if self.drop_remainder else -(-n // per)

  def memory_indices(self, epoch: int, step: int) -> np.ndarray:
    """Which memory rows batch ``(epoch, step)`` replays."""
    m, size = self.memory_rows, len(self.memory)
    if m == 0:
      return np.zeros(0, np.int64)
    rng = np.random.default_rng([self.seed, epoch, step, 1])
    return rng.permutation(size)[:m] if size >= m else rng.integers(0, size, m)

  def global_examples(self, epoch: int, step: int) -> list[EncodedExample | None]:
    per = self.current_rows
    perm = self.permutation(epoch)
    ex = self.data.examples
    current = [ex[r] for r in perm[step * per:(step + 1) * per].tolist()]
    replayed = [self.memory[i] for i in self.memory_indices(epoch, step).tolist()]
    return current + replayed + [None] * (per - len(current))
