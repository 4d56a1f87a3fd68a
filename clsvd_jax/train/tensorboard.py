"""TensorBoard scalars of a run (tensorboardX), written by process 0 only.

A ``run_dir`` that is a URL: tensorboardX writes ``gs://`` only through google-cloud-storage (and no other scheme),
so the event files go to a local temporary folder and ``sync`` copies them whole to ``<run_dir>/tensorboard`` (at
task boundaries and on ``close``); they are small (a few scalars per logged step).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from etils import epath

from clsvd_jax.train import outputs

log = logging.getLogger("clsvd_jax.train")


class Writer:
  """Scalars to ``<run_dir>/tensorboard``; a no-op when not ``enabled`` (processes other than 0)."""

  def __init__(self, run_dir: epath.Path, enabled: bool = True):
    self._w = None
    self._local: Path | None = None
    self._remote: epath.Path | None = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      return
    logdir = run_dir / "tensorboard"
    if outputs.is_local(logdir):
      self._w = SummaryWriter(str(logdir))
    else:
      self._local = Path(tempfile.mkdtemp(prefix="clsvd-tensorboard-"))
      self._remote = logdir
      self._w = SummaryWriter(str(self._local))

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._w is not None:
      self._w.add_scalar(tag, float(value), step)

  def sync(self) -> None:
    """Copies the event files to a ``run_dir`` URL; nothing to do for a local one (tensorboardX writes there)."""
    if self._w is None or self._remote is None:
      return
    self._w.flush()
    self._upload()

  def _upload(self) -> None:
    try:
      for f in sorted(self._local.rglob("*")):
        if f.is_file():
          (self._remote / f.relative_to(self._local).as_posix()).write_bytes(f.read_bytes())
    except OSError as e:
      # The logs are a view of the run, not its results: a failed upload must not stop training.
      log.warning("could not copy the TensorBoard logs to %s: %s", self._remote, e)

  def close(self) -> None:
    if self._w is not None:
      self._w.flush()
      self._w.close()
      if self._remote is not None:
        self._upload()
        shutil.rmtree(self._local, ignore_errors=True)
      self._w = None
