"""The train step on a mesh: pure, jitted with explicit in / out shardings (docs/design.md §10).

In ``step(params, opt_state, batch)`` parameters and optimizer state are donated: the step updates them in place,
so a device never holds two copies. Inputs and outputs carry the same shardings, hence the step compiles once and
consecutive calls feed each other without a resharding copy; new subspaces swapped in at a task boundary
(``clsvd_jax.set_subspaces``) keep shapes, dtypes and shardings, so the step does not recompile either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clsvd_jax.parallel import opt_state as opt_state_lib
from clsvd_jax.parallel import rules as rules_lib

StepFn = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


def make_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *, has_aux: bool = False) -> StepFn:
  """A pure train step from ``loss_fn(params, batch) -> loss`` (or ``(loss, aux_dict)`` with ``has_aux``).

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` with metrics ``loss``, ``grad_norm`` and,
    with ``has_aux``, the entries of the aux dict.
  """

  def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Any]:
    if has_aux:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      aux = {}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return params, opt_state, metrics

  return step


def jit_train_step(step: StepFn, mesh: Mesh, param_shardings: Any, opt_shardings: Any, batch_shardings: Any, *,
                   donate: bool = True, metrics_sharding: Any = None) -> Any:
  """Wraps a pure step in ``jax.jit`` with explicit in/out shardings.

  Args:
    step: ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.
    mesh: the device mesh.
    param_shardings: NamedShardings shaped like params (``param_shardings``).
    opt_shardings: NamedShardings shaped like the optimizer state (``opt_state_shardings``).
    batch_shardings: NamedShardings for the batch (a tree or one sharding for every batch array).
    donate: donate params and optimizer state (their old buffers are reused for the new values).
    metrics_sharding: sharding of the metrics (default replicated: they are small and read on every host).

  Returns:
    The jitted step. Call it with arrays laid out as the shardings say (``jax.device_put`` them first); the
    results come back in the same layout.
  """
  if metrics_sharding is None:
    metrics_sharding = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                 out_shardings=(param_shardings, opt_shardings, metrics_sharding),
                 donate_argnums=(0, 1) if donate else ())


def shard_training_state(params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Sequence[rules_lib.Rule] = rules_lib.DEFAULT_RULES, *,
                         axis_map: Mapping[str, Any] | None = None, opt_state: Any = None
                         ) -> tuple[Any, Any, Any, Any]:
  """Places params on the mesh by the partition rules and builds (or reshards) the optimizer state.

  Args:
    params: the parameters (host or device arrays).
    tx: the optimizer.
    mesh: the mesh.
    rules: partition rules (default LLaMA + T5).
    axis_map: logical axis -> mesh axes, see ``clsvd_jax.parallel.rules``.
    opt_state: an existing state to reshard (e.g. restored); default a fresh ``tx.init`` built sharded.

  Returns:
    ``(params, opt_state, param_shardings, opt_state_shardings)``, arrays already laid out.
  """
  p_sh = rules_lib.param_shardings(params, mesh, rules, axis_map=axis_map)
  params = jax.device_put(params, p_sh)
  if opt_state is None:
    opt_state, o_sh = opt_state_lib.init_opt_state(tx, params, p_sh)
  else:
    o_sh = opt_state_lib.opt_state_shardings(opt_state, params, p_sh)
    opt_state = jax.device_put(opt_state, o_sh)
  return params, opt_state, p_sh, o_sh
