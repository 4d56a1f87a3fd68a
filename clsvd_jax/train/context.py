"""What stays fixed for the length of a run (``RunContext``), built once from the config and the prepared data.

The context holds the method, its hooks (``hooks.MethodHooks``) and its stages, the optimizer and the jitted train
step, the layout of the arrays (one device or a mesh), the task scheduler (constrained methods), the
rank-classification scorer, and the services every phase shares: ``say``
(progress lines on process 0), the TensorBoard writer, the checkpointer and the watchdog. Whatever changes as the
run advances lives in ``run_state.RunState`` (where it stands) and ``run_state.TrainState`` (its arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

import clsvd_jax as cj
from clsvd_jax.config import ConfigError, MeshConfig, RunConfig
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import layout as layout_lib
from clsvd_jax.train import model_io
from clsvd_jax.train import rank_classification as rank_lib
from clsvd_jax.train import scheduler as sched_lib
from clsvd_jax.train import step as step_lib
from clsvd_jax.train.hooks import MethodHooks
from clsvd_jax.train.methods import METHOD_SECTIONS, Method, get_method
from clsvd_jax.train.phases.prepare import Prepared
from clsvd_jax.train.run_state import RunState, TrainState
from clsvd_jax.train.tensorboard import Writer
from clsvd_jax.train.watchdog import Watchdog


class RunInterrupted(RuntimeError):
  """Raised by ``run(..., stop_after_steps=N)`` to simulate a killed run (tests of ``--resume``)."""


@dataclasses.dataclass
class StepBudget:
  """Optimizer steps this call may still take (``stop_after_steps``; None: no limit)."""

  left: int | None = None

  def take(self) -> None:
    """Counts one step; raises ``RunInterrupted`` when the budget is spent."""
    if self.left is None:
      return
    if self.left <= 0:
      raise RunInterrupted("stopped by stop_after_steps")
    self.left -= 1


@dataclasses.dataclass
class RunContext:
  """Everything fixed for a run, and the services its phases share (see the module docstring).

  Attributes:
    config: the validated config.
    prepared: model, tokenizer and encoded data (``phases.prepare``).
    run_dir: where outputs and checkpoints go.
    method: the method (stages, constrained or not).
    stages: the task indices of each stage.
    tx: the optimizer.
    step: the jitted train step (its schedule is set per task with ``TrainStep.for_task``).
    layout: one device or a mesh.
    shapes: ``{path: shape}`` of the matrices the parameter policy constrains.
    scheduler: the task scheduler (constrained methods; None otherwise). Its records are part of every checkpoint.
    policy_counts: parameters per action of the parameter policy (for results.json).
    policy: the parameter policy in force, its reason and every parameter's action (``RunPolicy.to_dict``).
    main: whether this is process 0 (the one that prints and writes outputs).
    say: prints a progress line (a no-op on other processes or when silent).
    writer: TensorBoard scalars.
    checkpoints: saves checkpoints and remembers the last one.
    watchdog: stops a run that makes no progress.
    budget: optimizer steps this call may take (tests of ``--resume``).
    hooks: the method's hooks (``hooks.MethodHooks``).
    scorer: scores label options by likelihood (rank classification; None when ``eval.rank_classification`` is
      off).
  """

  config: RunConfig
  prepared: Prepared
  run_dir: epath.Path
  method: Method
  stages: list[list[int]]
  tx: optax.GradientTransformation
  step: step_lib.TrainStep
  layout: layout_lib.Layout
  shapes: dict[str, tuple[int, ...]]
  scheduler: sched_lib.TaskScheduler | None
  policy_counts: dict[str, int]
  policy: dict[str, Any]
  main: bool
  say: Callable[[str], None]
  writer: Writer
  checkpoints: ckpt_lib.Checkpointer
  watchdog: Watchdog
  budget: StepBudget
  hooks: MethodHooks | None = None
  scorer: rank_lib.Scorer | None = None

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  def stage_name(self, si: int) -> str:
    names = self.prepared.names
    stage = self.stages[si]
    return names[stage[0]] if len(stage) == 1 else "+".join(names[i] for i in stage)

  def stage_label(self, si: int) -> str:
    """``task 2/4 (amazon)`` for messages."""
    return f"task {si + 1}/{self.num_stages} ({self.stage_name(si)})"

  def save(self, state: RunState, arrays: TrainState) -> epath.Path:
    """A checkpoint of the run as it stands."""
    phase = self.watchdog.phase
    self.watchdog.beat(f"saving the checkpoint at global step {state.global_step} ({phase})")
    meta = {"run": state.to_dict(), "scheduler": self.scheduler.to_dict() if self.scheduler is not None else None,
            "anchor_paths": sorted(arrays.anchor) if any(np.ndim(a) for a in arrays.anchor.values()) else [],
            "tasks": self.prepared.names, "method": self.config.method}
    path = self.checkpoints.save(state.global_step, arrays.to_tree(), meta)
    self.watchdog.beat(phase)
    return path


def _without_other_methods(d: dict[str, Any], method: str) -> dict[str, Any]:
  """The config dict without the option sections of methods other than ``method`` (they cannot change its run)."""
  own = get_method(method).sections
  return {k: v for k, v in d.items() if k not in METHOD_SECTIONS or k in own}


def config_hash(config: RunConfig) -> str:
  """What must not change between a run and its resume (everything but where outputs go, display flags and the
  options of other methods)."""
  d = _without_other_methods(config.to_dict(), config.method)
  for key in ("run_dir", "name", "distributed"):
    d.pop(key, None)
  d["training"] = {k: v for k, v in d["training"].items()
                   if k not in ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "watchdog_seconds")}
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Config entries that cannot change the compiled step: everything else is in its cache key, so a new field
# recompiles by default rather than reusing a stale program.
_NOT_IN_STEP = {"run_dir", "name", "distributed", "data_dir", "tasks", "eval", "mesh"}
_TRAINING_NOT_IN_STEP = {"epochs", "steps_per_task", "batch_size", "max_length", "max_target_length", "seed",
                         "checkpoint_every", "keep_checkpoints", "log_every", "progress", "watchdog_seconds",
                         "max_truncated_share"}
_OSFT_NOT_IN_STEP = {"rank_policy", "basis_source", "start_protecting_from", "reset_moments", "calibration_batches",
                     "calibration_batch_size", "calibration_task", "min_trainable"}


def step_key(config: RunConfig, model: Any, labels: Any, layout: layout_lib.Layout) -> str:
  """The cache key of the train step (``step.TrainStep``): the config minus what cannot change the step, the
  model's family and config, the parameter labels and where the arrays live. Shapes and dtypes of the arrays
  are not needed: JAX keys its cache on them itself."""
  d = {k: v for k, v in _without_other_methods(config.to_dict(), config.method).items() if k not in _NOT_IN_STEP}
  d["training"] = {k: v for k, v in d["training"].items() if k not in _TRAINING_NOT_IN_STEP}
  d["osft"] = {k: v for k, v in d["osft"].items() if k not in _OSFT_NOT_IN_STEP}
  d["model_config"] = model_io.model_config_dict(model)
  d["family"] = model_io.family_of(model)
  d["labels"] = cj.flatten_with_paths(labels)
  d["layout"] = layout.describe()
  d["method_constrained"] = get_method(config.method).constrained
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def build_optimizer(config: RunConfig, params: Any) -> tuple[optax.GradientTransformation, Any]:
  """``(tx, labels)``: the run's optimizer and the parameter policy's label of every parameter (the policy of
  the run's method and start, ``step.policy_of_run``)."""
  policy = step_lib.policy_of_run(config).policy
  labels = policy.labels(params)
  tx = step_lib.build_optimizer(config.optimizer, config.osft, constrained=get_method(config.method).constrained,
                                policy=policy)
  return tx, labels


def build_context(config: RunConfig, prepared: Prepared, *, run_dir: epath.Path, say: Callable[[str], None],
                  stop_after_steps: int | None = None) -> tuple[RunContext, TrainState]:
  """The run's context and its arrays before the first boundary (placed on the mesh when there is one).

  Raises:
    ConfigError / DataError: a mesh that does not fit the devices, a parameter policy that trains nothing.
  """
  method = get_method(config.method)
  model = prepared.model
  apply_fn, params = model_io.functional(model)
  hooks = method.make_hooks(config, prepared, apply_fn)
  policy_counts, policy_record = hooks.describe_policy(params)
  trained = hooks.trainable(params)
  tx, labels = hooks.optimizer(params, trained)
  tcfg = config.training
  mesh_cfg = config.mesh
  if mesh_cfg is None and jax.process_count() > 1:
    # Parameters of a multi-host model do not fit one device: the default spreads them over all (FSDP).
    mesh_cfg = MeshConfig()
  if mesh_cfg is not None:
    if method.constrained and config.osft.solver != "exact":
      raise ConfigError(f"osft.solver: {config.osft.solver!r} runs on one device for now, and this run lays its "
                        "parameters out on a device mesh (the mesh section, or several processes): set "
                        "osft.solver: exact, or remove the mesh section")
    if trained is not params:
      raise ConfigError(f"method {config.method} trains other arrays than the model's parameters and runs on one "
                        "device only for now; remove the mesh section (and run one process)")
    layout, params, opt_state = layout_lib.on_mesh(mesh_cfg, prepared.kind, tcfg.batch_size, tx, params)
    trained = params
  else:
    layout, opt_state = layout_lib.single_device(prepared.kind, tcfg.batch_size), tx.init(trained)
  method_arrays = hooks.init_arrays(params, layout)
  flat_labels = cj.flatten_with_paths(labels)
  shapes = {path: s for path, s in model_io.constrained_matrices(model).items()
            if flat_labels.get(path) == "constrain"}
  stages = method.stages(len(prepared.names))
  scheduler = None
  if method.constrained:
    compute = functools.partial(cj.compute_subspaces, solver=config.osft.solver)
    if layout.mesh is not None:
      from clsvd_jax import parallel

      compute = functools.partial(parallel.compute_subspaces_sharded, mesh=layout.mesh)
    scheduler = sched_lib.TaskScheduler(config.osft, shapes, len(stages), compute_fn=compute)
  ocfg = config.optimizer
  step = step_lib.TrainStep(
      key=step_key(config, model, labels, layout), schedule=step_lib.Schedule.of(ocfg, 0),
      schedule_fn=step_lib.lr_schedule, apply_fn=apply_fn, tx=tx, kind=prepared.kind, grad_accum=ocfg.grad_accum,
      bf16_compute=tcfg.bf16_compute, clip_norm=ocfg.clip_norm,
      trainable=jax.tree.map(lambda a: a != "freeze", labels), shardings=layout.step_shardings,
      loss_terms=hooks.loss_terms)
  main = jax.process_index() == 0
  checkpoints = ckpt_lib.Checkpointer(run_dir, tcfg.keep_checkpoints)
  ctx = RunContext(
      config=config, prepared=prepared, run_dir=run_dir, method=method, stages=stages, tx=tx, step=step,
      layout=layout, shapes=shapes, scheduler=scheduler, policy_counts=policy_counts,
      policy=policy_record, main=main, say=say,
      writer=Writer(run_dir, enabled=main), checkpoints=checkpoints,
      watchdog=Watchdog(tcfg.watchdog_seconds, checkpoints.describe), budget=StepBudget(stop_after_steps),
      hooks=hooks, scorer=option_scorer(config, prepared, apply_fn))
  rng = jax.random.key_data(jax.random.key(tcfg.seed))
  anchor = {path: jnp.zeros((), jnp.float32) for path in shapes}
  if layout.replicated is not None:
    # Checkpointed with the sharded state: Orbax needs global arrays when several processes save.
    rng, anchor = layout.put_replicated((np.asarray(rng), {k: np.asarray(v) for k, v in anchor.items()}))
  return ctx, TrainState(trained, opt_state, anchor, rng, method_arrays)


def option_scorer(config: RunConfig, prepared: Prepared, apply_fn: Callable[..., Any]) -> rank_lib.Scorer | None:
  """The rank-classification scorer of a run (None when it is off or no task has label options)."""
  if not config.eval.rank_classification or not any(o is not None for o in prepared.options):
    return None
  return rank_lib.make_option_scorer(apply_fn, kind=prepared.kind, decoder_start_id=prepared.info.decoder_start_id)
