"""How a method plugs into the runner: ``MethodHooks``, every point where a method may differ from full fine-tuning.

The phases call these hooks and know nothing else about a method. The base class is plain full fine-tuning of the
model's parameters (``osft``, ``seqft``, ``mtl`` and ``gpm`` use it as it is: what distinguishes them is the
``Method`` registry entry and the task scheduler); a baseline overrides what it changes:

==================  =========================  ===============================================================
phase               hook                       overridden by
==================  =========================  ===============================================================
build_context       ``trainable``              lora / olora: the adapters are what the optimizer trains
                    ``optimizer``              lora / olora: AdamW on the active adapter slot only
                    ``describe_policy``        lora / olora: the base is frozen, the adapters train
                    ``init_arrays``            ewc: the penalty's state (``TrainState.method``, checkpointed)
train step          ``loss_terms``             lora / olora: base + adapters; ewc, olora: a penalty
                    ``step_input``             ewc: its state; lora / olora: the frozen base weights
boundary            ``before_stage``           replay: remember the finished task; ewc: its Fisher;
                                               olora: the next slot; pertask: back to the initial weights
train_task          ``train_batches``          replay: batches mixed with the memory
evaluate            ``eval_params``            lora / olora: the merged weights
                    ``evaluate_row``           pertask: one evaluation per row, the rest copied
write               ``results``                replay: the memory's size per task
==================  =========================  ===============================================================

State a method keeps between tasks is either arrays (``TrainState.method``: saved by Orbax with the parameters,
restored bitwise) or JSON (``RunState.method_state``: saved in the checkpoint's ``meta.json``), so a resumed run
continues exactly where the checkpoint was written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clsvd_jax.config import RunConfig
from clsvd_jax.train import step as step_lib

if TYPE_CHECKING:
  from clsvd_jax.data import BatchIterator
  from clsvd_jax.train.context import RunContext
  from clsvd_jax.train.layout import Layout
  from clsvd_jax.train.phases.prepare import Prepared
  from clsvd_jax.train.run_state import RunState, TrainState


class Row(NamedTuple):
  """One evaluation of the model on the tasks of the stream; one entry per task (None where not evaluated).

  Attributes:
    accuracy: exact-match accuracy.
    correct: exact-match correct answers.
    total: evaluation examples.
    option_rate: share of answers that are one of the task's labels (None: a free-form task).
    rank: rank-classification accuracy (None: a free-form task, or rank classification off).
  """

  accuracy: list[float | None]
  correct: list[int | None]
  total: list[int | None]
  option_rate: list[float | None]
  rank: list[float | None]


# ``score(params, tasks, desc, row) -> Row``: evaluates ``params`` on the task indices ``tasks`` (all: None) and
# writes their predictions to the file of evaluation ``row`` (``phases.evaluate``).
Scorer = Callable[[Any, Sequence[int] | None, str, str | None], Row]


class MethodHooks:
  """Full fine-tuning of the model's parameters; subclasses override what their method changes.

  Attributes:
    config: the run's config (after ``Method.resolve_config``).
    prepared: model, tokenizer and data.
    apply_fn: the model's pure apply function.
    loss_terms: the method's changes to the training loss (None: none).
  """

  loss_terms: step_lib.LossTerms | None = None

  def __init__(self, config: RunConfig, prepared: Prepared, apply_fn: Callable[..., Any]):
    self.config, self.prepared, self.apply_fn = config, prepared, apply_fn

  # -- build_context -------------------------------------------------------------------------------------------

  def trainable(self, params: Any) -> Any:
    """The tree the optimizer trains (``TrainState.params``), given the model's initial parameters."""
    return params

  def optimizer(self, params: Any, trainable: Any) -> tuple[optax.GradientTransformation, Any]:
    """``(tx, labels)``: the optimizer over ``trainable`` and the policy label of each of its leaves."""
    from clsvd_jax.train.context import build_optimizer

    del trainable
    return build_optimizer(self.config, params)

  def describe_policy(self, params: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Parameters per action and the policy record of results.json (``param_policy``).

    Raises:
      DataError: a policy that trains nothing.
    """
    run_policy = step_lib.policy_of_run(self.config)
    return step_lib.check_policy(params, run_policy.policy), run_policy.to_dict(params)

  def init_arrays(self, params: Any, layout: Layout) -> Any:
    """The method's arrays before the first task (``TrainState.method``, placed by ``layout``); None: none."""
    del params, layout
    return None

  # -- boundary, train -----------------------------------------------------------------------------------------

  def before_stage(self, ctx: RunContext, state: RunState, arrays: TrainState) -> TrainState:
    """The method's part of the boundary before stage ``state.stage`` (after the scheduler's); returns the arrays.

    Runs again when a run resumes at this boundary, so it must be a function of ``state`` and ``arrays``.
    """
    del ctx, state
    return arrays

  def train_batches(self, ctx: RunContext, state: RunState) -> BatchIterator:
    """The training batches of stage ``state.stage`` from ``state.position`` (this host's rows)."""
    from clsvd_jax.train.phases.train_task import train_iterator

    return train_iterator(ctx, state.stage, state.position)

  def step_input(self, arrays: TrainState) -> Any:
    """The train step's ``aux`` argument (what ``loss_terms`` read besides the trained tree)."""
    del arrays
    return None

  # -- evaluate, write -----------------------------------------------------------------------------------------

  def eval_params(self, arrays: TrainState) -> Any:
    """The model parameters evaluated after a stage."""
    return arrays.params

  def evaluate_row(self, ctx: RunContext, state: RunState, arrays: TrainState, score: Scorer) -> Row:
    """The row of R after stage ``state.stage``: every task scored with ``eval_params``."""
    name = ctx.stage_name(state.stage)
    return score(self.eval_params(arrays), None, f"eval after {name}", name)

  def results(self, state: RunState) -> dict[str, Any]:
    """Extra entries of results.json."""
    del state
    return {}


def commit(tree: Any, layout: Layout) -> Any:
  """A copy of a parameter-shaped tree in the parameters' layout (new buffers: the train step donates its inputs,
  and a tree kept across tasks must not share them)."""
  if layout.mesh is None:
    return _copy(jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  return _copy(jax.device_put(tree, layout.param_shardings))


@jax.jit
def _copy(tree: Any) -> Any:
  # A jitted function's outputs never alias its undonated inputs: these are new buffers, bitwise equal.
  return jax.tree.map(jnp.copy, tree)
