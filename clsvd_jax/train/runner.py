"""The continual-learning runner: a model through a stream of tasks, with evaluation after every task.

``run(config)`` calls the phases of ``clsvd_jax.train.phases`` in order::

  prepare -> start -> for each stage: boundary -> train_task -> evaluate -> checkpoint -> write

``RunContext`` (``context.py``) holds what is fixed for the run; ``RunState`` (``run_state.py``) says where the run
stands (stage, phase, step, data position, loss sums, R so far) and is the checkpoint's ``meta.json``;
``TrainState`` holds its arrays. ``resume=True`` continues from the newest usable checkpoint of ``run_dir`` and
produces the same results as an uninterrupted run.

A run never hangs silently (``watchdog.Watchdog``), says where it was when killed with SIGTERM, refuses a
``run_dir`` that holds another run unless told to continue it (``resume``) or replace it (``overwrite``), and
leaves no empty ``run_dir`` behind when it fails before writing anything.

Several processes (``jax.distributed``, initialised by ``clsvd train`` before anything touches a device): every
process runs ``run`` with the same config on one mesh over all devices (``config.mesh``, else every device on
``fsdp``). Each host reads only its rows of every training batch and contributes them to the global batch;
calibration and evaluation batches are small and read whole by every host (JAX treats them as replicated), and
results computed on sharded parameters come back through collectives, so every process holds the same R, ranks
and invariant. Only process 0 prints, draws progress bars, writes TensorBoard, ``config.yaml``, ``results.json``,
``R.csv`` and the plots; all processes write and read the Orbax checkpoints together (``run_dir`` must be a folder
every host sees, e.g. a bucket on a pod).

``run_dir`` is an ``etils.epath`` path (``outputs.run_path``): a local folder or a URL (``gs://bucket/run``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from clsvd_jax.config import RunConfig
from clsvd_jax.train import run_dir as run_dir_lib
from clsvd_jax.train.context import RunInterrupted, build_context
from clsvd_jax.train.methods import get_method
from clsvd_jax.train.phases.boundary import boundary
from clsvd_jax.train.phases.evaluate import evaluate_initial, evaluate_stage
from clsvd_jax.train.phases.prepare import Prepared, prepare
from clsvd_jax.train.phases.start import restore_params, start
from clsvd_jax.train.phases.train_task import TrainingError, train_task
from clsvd_jax.train.phases.write import write
from clsvd_jax.train.watchdog import RunStalled, RunTerminated, stop_on_sigterm

__all__ = ["Prepared", "RunInterrupted", "RunStalled", "RunTerminated", "TrainingError", "prepare",
           "restore_params", "run"]


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False, stop_after_steps: int | None = None,
        echo: Callable[[str], None] | None = print, prepared: Prepared | None = None) -> dict[str, Any]:
  """Runs the method of ``config`` through its task stream; see the module docstring.

  Args:
    config: a validated config (``clsvd_jax.config.load_config``).
    resume: continue from the newest usable checkpoint in ``config.run_dir`` (a fresh start, said so, when there
      is none).
    overwrite: delete what ``config.run_dir`` holds first (without it, a folder with files is refused).
    stop_after_steps: raise ``RunInterrupted`` after this many optimizer steps of this call (tests).
    echo: prints progress lines (None: silent).
    prepared: a ``prepare(config)`` result to reuse.

  Returns:
    The results dict (also written to ``<run_dir>/results.json``); ``results["diverged"]`` names the tasks whose
    loss diverged.

  Raises:
    ConfigError / DataError: bad config or data (before training starts), or a run_dir this run may not use.
    TrainingError: on a non-finite loss or gradient.
    RunStalled / RunTerminated: no progress for ``training.watchdog_seconds``, or SIGTERM.
  """
  say = (echo if jax.process_index() == 0 else None) or (lambda _msg: None)
  # What the run reads is the config as its method sees it (gpm: the osft section set to GPM's preset).
  config = get_method(config.method).resolve_config(config)
  path = run_dir_lib.check(config.run_dir, resume=resume, overwrite=overwrite)
  p = prepared or prepare(config)
  for note in p.notes:
    say(f"note: {note}")
  created = run_dir_lib.create(path, overwrite=overwrite)
  try:
    ctx, initial = build_context(config, p, run_dir=path, say=say, stop_after_steps=stop_after_steps)
    state, arrays = start(ctx, initial, resume=resume)
  except BaseException:
    run_dir_lib.remove_if_empty(path, created)
    raise

  with ctx.watchdog, stop_on_sigterm(ctx.watchdog.where):
    try:
      if state.baseline is None and config.eval.initial and not state.finished(ctx.num_stages):
        evaluate_initial(ctx, state, arrays)
      while not state.finished(ctx.num_stages):
        if state.phase == "boundary":
          ctx.watchdog.beat(f"the boundary before {ctx.stage_label(state.stage)}")
          arrays = boundary(ctx, state, arrays)
        if state.phase == "train":
          arrays = train_task(ctx, state, arrays)
        if state.phase == "eval":
          evaluate_stage(ctx, state, arrays)
          ctx.save(state, arrays)
          ctx.writer.sync()
    finally:
      ctx.writer.close()
  return write(ctx, state)
