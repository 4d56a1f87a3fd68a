"""Run checkpoints: Orbax for the arrays, a JSON file for everything else.

``<run_dir>/checkpoints/step_<global step>/`` holds ``state/`` (Orbax: params, optimizer state with the subspace
bases, the task-start copy of the constrained matrices for the invariant check, the RNG key) and ``meta.json``
(where the run stands: stage, step in the stage, data position, scheduler state, accuracies so far, the config).
``meta.json`` is written last, so a folder without it is an interrupted save and is ignored. Only the newest
``keep`` complete checkpoints are kept.

A checkpoint can still be damaged after the fact (a disk that filled up, a copy cut short): ``load_newest`` tries
the checkpoints of a run from the newest down and uses the first one whose ``meta.json`` parses and whose arrays
read back, reporting each one it skipped. With several processes only an unreadable ``meta.json`` is skipped
(process 0 reads them and every process follows); arrays that fail to read stop the run with the checkpoint named.

Arrays go through ``clsvd_jax.parallel.save_sharded`` / ``restore_sharded``: the state is stored by string paths,
restored into the layout the target asks for (another mesh works too).

Several processes: all of them call ``save`` / ``restore`` (Orbax writes and reads each shard on the host that
holds it), process 0 alone creates and prunes folders and writes ``meta.json``, and ``save`` returns on every
process only once the checkpoint is complete, so any process may read it next (``run_dir`` must be shared).

Paths are ``etils.epath`` paths (``outputs.run_path``): ``run_dir`` may be a bucket (``gs://...``), where Orbax
writes the shards and everything else goes through epath's fsspec / gfile backends.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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


class CheckpointError(ValueError):
  """No usable checkpoint: the message names each one tried and why it was skipped."""


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
  """The ``meta.json`` of a checkpoint.

  Raises:
    CheckpointError: naming the file, when it is missing, truncated or not JSON.
  """
  path = run_path(ckpt) / META
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise CheckpointError(f"{path} is missing (an interrupted save)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is damaged (truncated or not JSON: {e})") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path} is damaged (not a JSON object)")
  return meta


T = TypeVar("T")
_ALL_DAMAGED = -2


@dataclasses.dataclass
class Loaded:
  """What ``load_newest`` found: the checkpoint used, what its loader returned, and those skipped (with why)."""

  path: epath.Path
  value: Any
  skipped: list[tuple[epath.Path, str]]

  def notes(self) -> list[str]:
    return [f"checkpoint {p} is unusable ({why}); using the older {self.path}" for p, why in self.skipped]


def load_newest(run_dir: str | os.PathLike[str], load: Callable[[epath.Path, dict[str, Any]], T]) -> Loaded | None:
  """The newest checkpoint of ``run_dir`` that ``load(path, meta)`` reads without an error (None: no checkpoint).

  ``load`` raises ``CheckpointError`` or any error of the array reader for a damaged checkpoint; a
  ``ConfigError`` (a checkpoint of another config) is not a damage and goes through.

  Raises:
    CheckpointError: when every checkpoint is damaged (each one named with its reason).
  """
  from clsvd_jax.config import ConfigError

  candidates = _agreed_readable(run_dir)
  if candidates is None:
    return None
  readable, skipped = candidates
  for path, meta in readable:
    try:
      return Loaded(path, load(path, meta), skipped)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - TensorStore and Orbax raise many kinds for a damaged file
      if jax.process_count() > 1:
        raise CheckpointError(f"checkpoint {path}: its arrays cannot be read ({_first_line(e)}); move it away and "
                              "rerun to use the one before it") from None
      skipped.append((path, f"its arrays cannot be read: {_first_line(e)}"))
  raise CheckpointError("no usable checkpoint in " + os.fspath(run_dir) + ": " +
                        "; ".join(f"{p.name}: {why}" for p, why in skipped))


def load_one(path: epath.Path, load: Callable[[epath.Path, dict[str, Any]], T]) -> Loaded:
  """``load(path, meta)`` of one given checkpoint (no fallback: the caller chose it).

  Raises:
    CheckpointError: naming the checkpoint, when its meta or arrays cannot be read.
  """
  from clsvd_jax.config import ConfigError

  meta = read_meta(path)
  try:
    return Loaded(path, load(path, meta), [])
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - TensorStore and Orbax raise many kinds for a damaged file
    raise CheckpointError(f"checkpoint {path}: its arrays cannot be read ({_first_line(e)}); give another "
                          "checkpoint, or the run directory to use its newest usable one") from None


def _agreed_readable(run_dir: str | os.PathLike[str]
                     ) -> tuple[list[tuple[epath.Path, dict[str, Any]]], list[tuple[epath.Path, str]]] | None:
  """Complete checkpoints newest first with their metas, and those whose meta is unreadable; None when none exist.

  Several processes: the newest readable one as process 0 sees it, on every process.
  """
  if jax.process_count() == 1:
    found = list_checkpoints(run_dir)
    if not found:
      return None
    readable, skipped = [], []
    for path in reversed(found):
      try:
        readable.append((path, read_meta(path)))
      except CheckpointError as e:
        skipped.append((path, str(e)))
    return readable, skipped
  distributed.sync("clsvd:before-resume")
  step, skipped = -1, []
  if jax.process_index() == 0:
    for path in reversed(list_checkpoints(run_dir)):
      try:
        read_meta(path)
      except CheckpointError as e:
        skipped.append((path, str(e)))
        continue
      step = int(path.name[len(PREFIX):])
      break
    if step < 0 and skipped:
      step = _ALL_DAMAGED
  step = distributed.broadcast_int(step)
  if step == _ALL_DAMAGED:
    return [], skipped or [(checkpoint_root(run_dir), "every meta.json is damaged (see process 0)")]
  if step < 0:
    return None
  path = checkpoint_dir(run_dir, step)
  return [(path, read_meta(path))], skipped


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  # TensorStore appends a long dump of its spec to the one sentence that matters.
  first = (text[0] if text else "").split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {first}"[:300]


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


@dataclasses.dataclass
class Checkpointer:
  """Writes a run's checkpoints (``save``) and remembers the last one, for messages that must name it."""

  run_dir: epath.Path
  keep: int
  last: epath.Path | None = None

  def save(self, global_step: int, arrays: Any, meta: Mapping[str, Any]) -> epath.Path:
    self.last = save(self.run_dir, global_step, arrays, meta, keep=self.keep)
    return self.last

  def describe(self) -> str:
    return f"the last checkpoint is {self.last}" if self.last is not None else "no checkpoint was written yet"
