"""The method switch of the runner: a small registry of how a method walks the task stream.

A method says which stages it trains (one stage per task for sequential methods, one stage holding every task for
multi-task learning) and whether the task scheduler protects subspaces before a stage. New methods drop in with
``register_method(Method(...))`` and are then accepted by the config's ``method`` key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Method:
  """How a continual-learning method runs through the stream.

  Attributes:
    name: the config's ``method`` value.
    constrained: the task scheduler computes and installs protected subspaces before each stage (else every
      subspace stays at rank 0, which makes the constrained optimizer equal to its inner AdamW exactly).
    joint: train all tasks in one stage on the union of their data (an upper bound), instead of one after another.
    description: one line for ``clsvd inspect`` and the docs.
  """

  name: str
  constrained: bool
  joint: bool = False
  description: str = ""

  def stages(self, num_tasks: int) -> list[list[int]]:
    """The task indices trained in each stage."""
    if self.joint:
      return [list(range(num_tasks))]
    return [[i] for i in range(num_tasks)]


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
  """Adds a method to the registry (``overwrite`` to replace one of the same name)."""
  if method.name in METHODS and not overwrite:
    raise ValueError(f"method {method.name!r} is already registered; pass overwrite=True to replace it")
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  """The registered method called ``name``."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
  return METHODS[name]


def method_names() -> Sequence[str]:
  return tuple(METHODS)


register_method(Method("osft", constrained=True,
                       description="orthogonal-complement full fine-tuning (adaptive SVD), task after task"))
register_method(Method("seqft", constrained=False,
                       description="plain sequential full fine-tuning (same optimizer, nothing protected)"))
register_method(Method("mtl", constrained=False, joint=True,
                       description="multi-task learning on all tasks at once (upper bound)"))
