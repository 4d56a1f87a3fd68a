"""Run checkpoints: Orbax for the arrays, a JSON file for everything else.

``<run_dir>/checkpoints/step_<global step>/`` holds ``state/`` (Orbax: params, optimizer state with the subspace
bases, the task-start copy of the constrained matrices for the invariant check, the RNG key) and ``meta.json``
(where the run stands: stage, step in the stage, data position, scheduler state, accuracies so far, the config).
``meta.json`` is written last, so a folder without it is an interrupted save and is ignored. Only the newest
``keep`` complete checkpoints are kept.

Arrays go through ``clsvd_jax.parallel.save_sharded`` / ``restore_sharded``: the state is stored by string paths,
restored into the layout the target asks for (another mesh works too).

Several processes: all of them call ``save`` / ``restore`` (Orbax writes and reads each shard on the host that
holds it), process 0 alone creates and prunes folders and writes ``meta.json``, and ``save`` returns on every
process only once the checkpoint is complete, so any process may read it next (``run_dir`` must be shared).

Paths are ``etils.epath`` paths (``outputs.run_path``): ``run_dir`` may be a bucket (``gs://...``), where Orbax
writes the shards and everything else goes through epath's fsspec / gfile backends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from clsvd_jax.parallel import checkpoint as pc
from clsvd_jax.parallel import distributed
from clsvd_jax.train.outputs import is_local, run_path, write_json

META = "meta.json"
STATE = "state"
PREFIX = "step_"


def checkpoint_root(run_dir: str | os.PathLike[str]) -> epath.Path:
  return run_path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[epath.Path]:
  """Complete checkpoints (with ``meta.json``), oldest first."""
  root = checkpoint_root(run_dir)
  if not root.is_dir():
    return []
  found = []
  for d in root.iterdir():
    if d.is_dir() and d.name.startswith(PREFIX) and (d / META).is_file():
      try:
        found.append((int(d.name[len(PREFIX):]), d))
      except ValueError:
        continue
  return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> epath.Path | None:
  """The newest complete checkpoint, or None."""
  found = list_checkpoints(run_dir)
  return found[-1] if found else None


def checkpoint_dir(run_dir: str | os.PathLike[str], global_step: int) -> epath.Path:
  """The folder of the checkpoint at ``global_step``."""
  return checkpoint_root(run_dir) / f"{PREFIX}{global_step:08d}"


def agreed_latest_checkpoint(run_dir: str | os.PathLike[str]) -> epath.Path | None:
  """``latest_checkpoint`` as process 0 sees it, on every process (one process: the same thing).

  With several hosts a folder another host is still writing could make them disagree; they resume from one.
  """
  if jax.process_count() == 1:
    return latest_checkpoint(run_dir)
  distributed.sync("clsvd:before-resume")
  found = latest_checkpoint(run_dir) if jax.process_index() == 0 else None
  step = distributed.broadcast_int(-1 if found is None else int(found.name[len(PREFIX):]))
  return None if step < 0 else checkpoint_dir(run_dir, step)


def save(run_dir: str | os.PathLike[str], global_step: int, arrays: Mapping[str, Any], meta: Mapping[str, Any], *,
         keep: int = 2) -> epath.Path:
  """Writes one checkpoint and prunes old ones.

  Args:
    run_dir: the run directory.
    global_step: optimizer steps so far over the whole run (names the folder).
    arrays: a pytree of jax arrays (``{"params": ..., "opt_state": ..., ...}``).
    meta: JSON-serialisable run position.
    keep: complete checkpoints to keep (the newest).

  Returns:
    The checkpoint folder.
  """
  d = checkpoint_dir(run_dir, global_step)
  main = jax.process_index() == 0
  if main:
    if d.exists():
      _rmtree(d)
    if is_local(d):
      # A bucket has no folders to make: Orbax's and meta.json's objects make the prefix.
      d.mkdir(parents=True)
  distributed.sync(f"clsvd:checkpoint-folder-{global_step}")
  pc.save_sharded(d / STATE, arrays, force=True)
  if main:
    write_json(d / META, dict(meta, global_step=global_step))
    for old in list_checkpoints(run_dir)[:-keep]:
      _rmtree(old, ignore_errors=True)
  # No process goes on (and maybe reads the run's checkpoints) before meta.json is there and pruning is done.
  distributed.sync(f"clsvd:checkpoint-done-{global_step}")
  return d


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
  return json.loads((run_path(ckpt) / META).read_text(encoding="utf-8"))


def restore(ckpt: str | os.PathLike[str], target: Any) -> Any:
  """Reads the arrays of a checkpoint into the structure and layout of ``target`` (arrays or abstract arrays).

  Raises:
    ValueError: naming the paths, when the checkpoint was written by another model / optimizer.
  """
  shardings = jax.tree.map(_sharding_of, target)
  abstract = pc.abstract_state(target, shardings)
  return pc.restore_sharded(run_path(ckpt) / STATE, abstract)


def _rmtree(d: epath.Path, ignore_errors: bool = False) -> None:
  try:
    d.rmtree()
  except OSError:
    if not ignore_errors:
      raise


def _sharding_of(x: Any) -> Any:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return sharding
