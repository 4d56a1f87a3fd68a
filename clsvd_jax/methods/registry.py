"""The registry of continual-learning methods: how a method walks the task stream, and where its runner hooks are.

A method says which stages it trains (one stage per task for sequential methods, one stage holding every task for
multi-task learning), whether the task scheduler protects subspaces before a stage, which config sections hold
its options, and where its runner hooks are (``clsvd_jax.train.hooks.MethodHooks``: batch source, loss terms,
trained tree, boundary action, evaluation, checkpointed state). New methods drop in with
``register_method(Method(...))`` and are then accepted by the config's ``method`` key.

A leaf module (the standard library only; hooks and config presets are ``"module:attribute"`` references loaded
when a run starts): ``clsvd_jax.config`` validates ``method`` against ``METHODS`` here without importing the
runner. The runner reaches it as ``clsvd_jax.train.methods``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

# The hooks of full fine-tuning (``Method.hooks`` None); a reference, so this module imports nothing of the runner.
_BASE_HOOKS = "clsvd_jax.train.hooks:MethodHooks"
# Config sections that belong to one method each: a run's config hash and train step ignore those of other methods.
METHOD_SECTIONS = ("replay", "ewc", "lora", "gpm")


def _load(ref: str | Callable[..., Any]) -> Callable[..., Any]:
  """A callable, or ``"module:attribute"`` imported on first use (the baselines import the runner's modules)."""
  if callable(ref):
    return ref
  module, _, attr = ref.partition(":")
  return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Method:
  """How a continual-learning method runs through the stream.

  Attributes:
    name: the config's ``method`` value.
    constrained: the task scheduler computes and installs protected subspaces before each stage (else every
      subspace stays at rank 0, which makes the constrained optimizer equal to its inner AdamW exactly).
    joint: train all tasks in one stage on the union of their data (an upper bound), instead of one after another.
    description: one line for ``clsvd inspect`` and the docs.
    sections: the config sections of its options (e.g. ``("replay",)``), part of its runs' config hash.
    hooks: builds the run's ``MethodHooks`` from ``(config, prepared, apply_fn)``: a callable or
      ``"module:attribute"``; None: ``MethodHooks`` (full fine-tuning).
    configure: ``RunConfig -> RunConfig`` applied before the run reads its config (e.g. gpm sets the ``osft``
      section to its preset); a callable or ``"module:attribute"``; None: the config as it is.
  """

  name: str
  constrained: bool
  joint: bool = False
  description: str = ""
  sections: tuple[str, ...] = ()
  hooks: str | Callable[..., Any] | None = None
  configure: str | Callable[..., Any] | None = None

  def stages(self, num_tasks: int) -> list[list[int]]:
    """The task indices trained in each stage."""
    if self.joint:
      return [list(range(num_tasks))]
    return [[i] for i in range(num_tasks)]

  def resolve_config(self, config: Any) -> Any:
    """The config the run reads (``configure`` applied)."""
    return config if self.configure is None else _load(self.configure)(config)

  def make_hooks(self, config: Any, prepared: Any, apply_fn: Callable[..., Any]) -> Any:
    """The run's ``MethodHooks``.

    Raises:
      ConfigError: the method cannot run this config (naming the key and the fix).
    """
    return _load(self.hooks or _BASE_HOOKS)(config, prepared, apply_fn)


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
  """The registered methods' names, in registration order."""
  return tuple(METHODS)


_BASELINES = "clsvd_jax.train.baselines"

register_method(Method("osft", constrained=True,
                       description="orthogonal-complement full fine-tuning (adaptive SVD), task after task"))
register_method(Method("seqft", constrained=False,
                       description="plain sequential full fine-tuning (same optimizer, nothing protected)"))
register_method(Method("mtl", constrained=False, joint=True,
                       description="multi-task learning on all tasks at once (upper bound)"))
register_method(Method("replay", constrained=False, sections=("replay",), hooks=f"{_BASELINES}.replay:ReplayHooks",
                       description="sequential fine-tuning with a memory of N examples per finished task mixed "
                                   "into later batches"))
register_method(Method("ewc", constrained=False, sections=("ewc",), hooks=f"{_BASELINES}.ewc:EwcHooks",
                       description="elastic weight consolidation: a diagonal-Fisher quadratic penalty towards the "
                                   "weights of the finished tasks"))
register_method(Method("lora", constrained=False, sections=("lora",), hooks=f"{_BASELINES}.lora:LoraHooks",
                       description="sequential LoRA: one low-rank adapter trained through the stream, base frozen"))
register_method(Method("olora", constrained=False, sections=("lora",), hooks=f"{_BASELINES}.lora:OLoraHooks",
                       description="O-LoRA: a new LoRA adapter per task, old ones frozen, orthogonality penalty"))
register_method(Method("gpm", constrained=True, sections=("gpm",), configure=f"{_BASELINES}.gpm:configure",
                       description="gradient projection memory: one-sided projection off the finished tasks' "
                                   "input-activation span"))
register_method(Method("pertask", constrained=False, hooks=f"{_BASELINES}.pertask:PerTaskHooks",
                       description="a fresh copy of the initial model per task (upper bound that needs the task "
                                   "id)"))
