"""Phase 2, start: a fresh run, or the state of the newest usable checkpoint (``--resume``).

A resumed run continues exactly where its checkpoint was written: the ``RunState`` of ``meta.json`` (stage, phase,
step, data position, loss sums, R so far), the arrays, and the task scheduler's records. A checkpoint written with
another config is refused; a damaged one is skipped for the one before it (``checkpoint.load_newest``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

import clsvd_jax as cj
from clsvd_jax.config import ConfigError, RunConfig, dump_config
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import layout as layout_lib
from clsvd_jax.train import model_io
from clsvd_jax.train import scheduler as sched_lib
from clsvd_jax.train.context import RunContext, config_hash
from clsvd_jax.train.methods import get_method
from clsvd_jax.train.phases.boundary import copy_f32
from clsvd_jax.train.phases.prepare import Prepared
from clsvd_jax.train.run_state import RunState, TrainState


def start(ctx: RunContext, initial: TrainState, *, resume: bool) -> tuple[RunState, TrainState]:
  """The run's state and arrays to continue from (``initial``, the fresh arrays, when starting anew).

  Raises:
    ConfigError: the checkpoint was written with another config.
    CheckpointError: every checkpoint of ``run_dir`` is damaged.
  """
  fresh = RunState(config_hash=config_hash(ctx.config))
  if resume:
    loaded = ckpt_lib.load_newest(ctx.run_dir, functools.partial(_load, ctx, initial, fresh.config_hash))
    if loaded is not None:
      for note in loaded.notes():
        ctx.say(f"note: {note}")
      state, arrays, scheduler = loaded.value
      ctx.scheduler = scheduler
      ctx.checkpoints.last = loaded.path
      if state.finished(ctx.num_stages):
        ctx.say(f"the run in {ctx.run_dir} is finished ({ctx.num_stages}/{ctx.num_stages} stages, checkpoint "
                f"{loaded.path.name}): nothing to resume; its results are rewritten from that checkpoint")
      else:
        ctx.say(f"resumed from {loaded.path} ({ctx.stage_label(state.stage)}, step {state.step}, phase "
                f"{state.phase})")
      return state, arrays
    ctx.say(f"--resume: no checkpoint in {ctx.run_dir}; starting from the beginning")
  if ctx.main:
    dump_config(ctx.config, ctx.run_dir / "config.yaml")
  return fresh, initial


def _load(ctx: RunContext, initial: TrainState, want_hash: str, path: Any, meta: dict[str, Any]
          ) -> tuple[RunState, TrainState, sched_lib.TaskScheduler | None]:
  run = meta.get("run") or {}
  if run.get("config_hash") != want_hash:
    raise ConfigError(f"--resume: the checkpoint {path} was written with another config (hash "
                      f"{run.get('config_hash')} vs {want_hash}); resume with the same config or start a new run_dir")
  state = RunState.from_dict(run)
  anchor = initial.anchor
  if meta.get("anchor_paths"):
    # Restore target: same shapes and layout as the weights.
    flat = cj.flatten_with_paths(initial.params)
    anchor = copy_f32({p: flat[p] for p in meta["anchor_paths"]})
  restored = ckpt_lib.restore(path, initial._replace(anchor=anchor).to_tree())
  scheduler = ctx.scheduler
  if scheduler is not None:
    scheduler = sched_lib.TaskScheduler.from_dict(ctx.config.osft, meta["scheduler"], compute_fn=scheduler.compute_fn)
  return state, TrainState.from_tree(restored), scheduler


def restore_params(config: RunConfig, prepared: Prepared, where: str | os.PathLike[str]) -> ckpt_lib.Loaded:
  """The parameters of a checkpoint of a run of ``config`` (for ``clsvd eval --checkpoint``).

  Args:
    where: a checkpoint folder (``step_*``, used as it is) or a run directory (its newest usable checkpoint).

  Returns:
    ``Loaded`` with the model parameters as ``value`` (the method's ``eval_params``: e.g. LoRA's merged weights),
    the checkpoint used and those skipped.

  Raises:
    CheckpointError: the folder holds no usable checkpoint.
  """
  return restore_arrays(config, prepared, where, model_params=True)


def restore_arrays(config: RunConfig, prepared: Prepared, where: str | os.PathLike[str], *,
                   model_params: bool = False) -> ckpt_lib.Loaded:
  """The arrays (``TrainState``) of a checkpoint of a run of ``config``, on one device.

  Args:
    where: a checkpoint folder (``step_*``, used as it is) or a run directory (its newest usable checkpoint).
    model_params: return the model parameters the method evaluates (``MethodHooks.eval_params``) instead.

  Raises:
    CheckpointError: the folder holds no usable checkpoint.
  """
  method = get_method(config.method)
  config = method.resolve_config(config)
  apply_fn, params = model_io.functional(prepared.model)
  hooks = method.make_hooks(config, prepared, apply_fn)
  trained = hooks.trainable(params)
  tx, labels = hooks.optimizer(params, trained)
  shapes = model_io.constrained_matrices(prepared.model)
  constrained = [p for p, label in cj.flatten_with_paths(labels).items() if label == "constrain" and p in shapes]
  opt_state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(tx.init, trained))
  rng = jax.random.key_data(jax.random.key(0))
  method_arrays = hooks.init_arrays(params, layout_lib.single_device(prepared.kind, config.training.batch_size))

  def load(path: Any, meta: dict[str, Any]) -> Any:
    full = set(meta.get("anchor_paths") or [])
    anchor = {p: jnp.zeros(shapes[p] if p in full else (), jnp.float32) for p in constrained}
    target = TrainState(trained, opt_state, anchor, rng, method_arrays).to_tree()
    arrays = TrainState.from_tree(ckpt_lib.restore(path, target))
    return hooks.eval_params(arrays) if model_params else arrays

  path = ckpt_lib.run_path(where)
  if (path / ckpt_lib.META).is_file():
    return ckpt_lib.load_one(path, load)
  loaded = ckpt_lib.load_newest(path, load)
  if loaded is None:
    raise ckpt_lib.CheckpointError(f"--checkpoint {path}: neither a checkpoint folder (with {ckpt_lib.META}) nor a "
                                   "run directory holding one")
  return loaded
