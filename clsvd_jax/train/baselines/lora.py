"""``method: lora`` and ``method: olora``: adapters over the frozen base model.

What the optimizer trains (``TrainState.params``) is the adapter tree ``{path: LoraFactors}``
(``methods.lora.init_adapters``, one slot for ``lora``, one per task for ``olora``); the base weights are fixed for
the run (the model as the config builds it), held by these hooks and passed to the step as its ``aux`` argument;
the loss applies the model to ``merge(base, adapters, alpha / rank)``. The optimizer is AdamW restricted to the
active slot (``only_active_slot``). ``olora`` starts every task on a fresh optimizer state with the task's own slot
active (the finished slots stay frozen: masked gradient and masked update) and adds O-LoRA's penalty
(``olora_penalty``: ``lora.lambda1`` orthogonality to the older slots, ``lora.lambda2`` norm of the new one) once per
step. Evaluation, ``clsvd eval --checkpoint`` and the export use the merged weights.

The adapters are checkpointed with their optimizer state; the base is rebuilt from the config on resume (a
checkpoint of ``model.path``, or ``model.config`` with ``model.init_seed``), so it is not saved. One device only
for now (a mesh is refused when the context is built).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import optax

import clsvd_jax as cj
from clsvd_jax.config import ConfigError
from clsvd_jax.methods import lora as lora_lib
from clsvd_jax.train import model_io
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.hooks import MethodHooks, commit

if TYPE_CHECKING:
  from clsvd_jax.train.context import RunContext
  from clsvd_jax.train.layout import Layout
  from clsvd_jax.train.run_state import RunState, TrainState

# Folded into the run's seed for the adapters' initialisation.
_ADAPTER_SEED = 7


def lora_options(config: Any) -> lora_lib.LoraOptions:
  """The ``lora`` section as ``methods.lora.LoraOptions``."""
  c = config.lora
  targets = tuple(c.targets) if c.targets is not None else lora_lib.DEFAULT_TARGETS
  return lora_lib.LoraOptions(rank=c.rank, alpha=c.alpha, targets=targets, lambda1=c.lambda1, lambda2=c.lambda2,
                              orthogonality=c.orthogonality)


@functools.partial(jax.jit, static_argnums=2)
def _merged(base: Any, adapters: Any, scale: float) -> Any:
  return lora_lib.merge(base, adapters, scale)


class LoraHooks(MethodHooks):
  """Sequential LoRA: one adapter slot trained through every task."""

  per_task_slots = False

  def __init__(self, config: Any, prepared: Any, apply_fn: Any):
    super().__init__(config, prepared, apply_fn)
    self.options = lora_options(config)
    try:
      self.targets = lora_lib.target_shapes(model_io.constrained_matrices(prepared.model), self.options.targets)
    except ValueError as e:
      raise ConfigError(f"{e}") from None
    self.slots = len(prepared.names) if self.per_task_slots else 1
    scale = self.options.scale
    self.loss_terms = step_lib.LossTerms(model_params=lambda adapters, base: lora_lib.merge(base, adapters, scale),
                                         penalty=self._penalty())
    self.base: Any = None

  def _penalty(self) -> Any:
    return None

  def trainable(self, params: Any) -> dict[str, lora_lib.LoraFactors]:
    key = jax.random.fold_in(jax.random.key(self.config.training.seed), _ADAPTER_SEED)
    return lora_lib.init_adapters(key, self.targets, rank=self.options.rank, slots=self.slots)

  def optimizer(self, params: Any, trainable: Any) -> tuple[optax.GradientTransformation, Any]:
    c = self.config.optimizer
    # Learning rate 1: the train step scales the final update by the schedule.
    adamw = optax.adamw(1.0, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    return lora_lib.only_active_slot(adamw), jax.tree.map(lambda _: "train", trainable)

  def describe_policy(self, params: Any) -> tuple[dict[str, int], dict[str, Any]]:
    paths = list(cj.flatten_with_paths(params))
    record = {"default": "freeze", "reason": f"{self.config.method}: the base model is frozen; rank-"
              f"{self.options.rank} adapters (alpha {self.options.alpha:g}) train on the matrices lora.targets "
              "selects", "targets": list(self.options.targets), "adapted": sorted(self.targets), "slots": self.slots,
              "labels": {p: "freeze" for p in paths}}
    return {"constrain": 0, "freeze": len(paths), "train": 0, "adapters": len(self.targets)}, record

  def init_arrays(self, params: Any, layout: Layout) -> None:
    self.base = commit(params, layout)
    return None

  def step_input(self, arrays: TrainState) -> Any:
    return self.base

  def eval_params(self, arrays: TrainState) -> Any:
    return _merged(self.base, arrays.params, self.options.scale)


class OLoraHooks(LoraHooks):
  """O-LoRA: slot t trains on task t from a fresh optimizer state; the older slots are frozen."""

  per_task_slots = True

  def _penalty(self) -> Any:
    options = self.options
    if not (options.lambda1 or options.lambda2):
      return None
    return lambda adapters, base, opt_state: lora_lib.olora_penalty(adapters, opt_state.active, options)

  def before_stage(self, ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
    fresh = lora_lib.set_active_slot(ctx.tx.init(arrays.params), state.stage)
    return arrays._replace(opt_state=ctx.layout.put_opt_state(fresh))
