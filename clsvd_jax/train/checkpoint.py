"""Run checkpoints: Orbax for the arrays, a JSON file for everything else.

``<run_dir>/checkpoints/step_<global step>/`` holds ``state/`` (Orbax: params, optimizer state with the subspace
bases, the task-start copy of the constrained matrices for the invariant check, the RNG key) and ``meta.json``
(where the run stands: stage, step in the stage, data position, scheduler state, accuracies so far, the config).
``meta.json`` is written last, so a folder without it is an interrupted save and is ignored. Only the newest
``keep`` complete checkpoints are kept.

Arrays go through ``clsvd_jax.parallel.save_sharded`` / ``restore_sharded``: the state is stored by string paths,
restored into the layout the target asks for (another mesh works too).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from clsvd_jax.parallel import checkpoint as pc
from clsvd_jax.train.outputs import write_json

META = "meta.json"
STATE = "state"
PREFIX = "step_"


def checkpoint_root(run_dir: str | os.PathLike[str]) -> Path:
  return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
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


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
  """The newest complete checkpoint, or None."""
  found = list_checkpoints(run_dir)
  return found[-1] if found else None


def save(run_dir: str | os.PathLike[str], global_step: int, arrays: Mapping[str, Any], meta: Mapping[str, Any], *,
         keep: int = 2) -> Path:
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
  d = checkpoint_root(run_dir) / f"{PREFIX}{global_step:08d}"
  if d.exists():
    shutil.rmtree(d)
  d.mkdir(parents=True)
  pc.save_sharded(d / STATE, arrays, force=True)
  write_json(d / META, dict(meta, global_step=global_step))
  for old in list_checkpoints(run_dir)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return d


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
  return json.loads((Path(ckpt) / META).read_text(encoding="utf-8"))


def restore(ckpt: str | os.PathLike[str], target: Any) -> Any:
  """Reads the arrays of a checkpoint into the structure and layout of ``target`` (arrays or abstract arrays).

  Raises:
    ValueError: naming the paths, when the checkpoint was written by another model / optimizer.
  """
  shardings = jax.tree.map(_sharding_of, target)
  abstract = pc.abstract_state(target, shardings)
  return pc.restore_sharded(Path(ckpt) / STATE, abstract)


def _sharding_of(x: Any) -> Any:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return sharding
