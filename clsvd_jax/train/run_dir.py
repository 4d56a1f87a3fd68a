"""The run directory: a run never writes into another run's folder unless asked to.

``check`` runs before anything is read or written: a ``run_dir`` that is a file or lies below one is refused, and
so is a folder that already holds files, unless the run continues it (``--resume``) or replaces it
(``--overwrite``). ``create`` makes the folder (after the config and the data have been read, so a bad config
leaves nothing behind) and, with ``overwrite``, deletes what was there first. ``remove_if_empty`` undoes ``create``
when the run fails before writing anything.

With several processes, process 0 looks at the folder and every process follows its verdict (one of them may
already have written into it by the time a slower one looks).
"""

from __future__ import annotations

import os

import jax
from etils import epath

from clsvd_jax.config import ConfigError
from clsvd_jax.parallel import distributed
from clsvd_jax.train import outputs

_OK, _FILE, _BELOW_FILE, _NOT_EMPTY = range(4)


def _local_verdict(path: epath.Path) -> tuple[int, str]:
  if path.is_file():
    return _FILE, ""
  if outputs.is_local(path):
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
    if parent.exists() and not parent.is_dir():
      return _BELOW_FILE, os.fspath(parent)
  if path.is_dir():
    entries = sorted(p.name for p in path.iterdir())
    if entries:
      return _NOT_EMPTY, ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
  return _OK, ""


def check(run_dir: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> epath.Path:
  """Refuses a ``run_dir`` this run must not write to; returns it as a path.

  Raises:
    ConfigError: ``run_dir`` is a file, lies below a file, or holds files while neither ``resume`` nor
      ``overwrite`` is set; or both are set.
  """
  try:
    path = outputs.run_path(run_dir)
  except ValueError as e:
    raise ConfigError(f"run_dir: {e}") from None
  if resume and overwrite:
    raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in run_dir, "
                      "--overwrite deletes it; give one")
  verdict, detail = _local_verdict(path) if jax.process_index() == 0 else (_OK, "")
  verdict = distributed.broadcast_int(verdict) if jax.process_count() > 1 else verdict
  if verdict == _FILE:
    raise ConfigError(f"run_dir: {path} is a file; give a folder (it is created when missing), e.g. --run-dir "
                      f"{path}_run")
  if verdict == _BELOW_FILE:
    raise ConfigError(f"run_dir: {path} lies below {detail or 'a file'}, which is a file, not a folder; give "
                      "another run_dir")
  if verdict == _NOT_EMPTY and not (resume or overwrite):
    where = f" ({detail})" if detail else ""
    raise ConfigError(f"run_dir: {path} already holds files{where}; continue that run with --resume, write to "
                      "another folder with --run-dir, or pass --overwrite to delete it and start again")
  return path


def create(path: epath.Path, *, overwrite: bool) -> bool:
  """Makes the run folder, emptied first with ``overwrite``; returns whether this call created it."""
  main = jax.process_index() == 0
  existed = path.exists()
  if main and overwrite and existed:
    for entry in path.iterdir():
      if entry.is_dir():
        entry.rmtree()
      else:
        entry.unlink()
  if main:
    outputs.make_dirs(path)
  distributed.sync("clsvd:run-dir")
  return not existed


def remove_if_empty(path: epath.Path, created: bool) -> None:
  """Removes a folder ``create`` made when the run failed before writing into it."""
  if not created or jax.process_index() != 0 or not outputs.is_local(path):
    return
  try:
    if path.is_dir() and not any(path.iterdir()):
      path.rmdir()
  except OSError:
    pass  # the error that brought us here matters more than a leftover empty folder
