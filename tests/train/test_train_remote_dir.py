"""A ``gs://`` run_dir end to end, offline: kill, resume, outputs, all in a fake bucket.

``etils.epath`` sends ``gs://`` paths to its fsspec backend (TensorFlow is not installed); the test swaps the
backend's GCS filesystem for an in-memory fsspec one, so every file the runner reads or writes through epath
(config.yaml, meta.json, checkpoint listing and pruning, results.json, R.csv, the plots, TensorBoard logs) lands in
memory, and anything written with plain ``open`` / ``pathlib`` would show up instead as a local ``gs:`` folder.

Orbax is the one exception: it writes array shards through TensorStore, whose ``gs://`` driver needs the network.
Its two entry points (``save_sharded`` / ``restore_sharded``) are redirected to a local folder mirroring the bucket
path; everything around them (folder listing, ``meta.json``, pruning, choosing the checkpoint to resume) stays in
the fake bucket.
"""

import json
import os

import numpy as np
import pytest
from _train_helpers import tiny_config_dict
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.parallel import checkpoint as pc
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import outputs, runner

REMOTE = "gs://fake-bucket/runs/r1"


class _FakeGCS(MemoryFileSystem):
  """An in-memory filesystem that takes ``gs://bucket/key`` paths (stored as ``/bucket/key``)."""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    return super()._strip_protocol(path.removeprefix("gs://"))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The fake bucket (its fsspec filesystem) and the local folder standing in for Orbax's gs:// writes."""
  fs = _FakeGCS(global_store=False, skip_instance_cache=True)
  real_fs = epath_backend.fsspec_backend.fs

  def fs_for(path):
    return fs if os.fspath(path).startswith("gs://") else real_fs(path)

  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", fs_for)
  # Whatever is installed, gs:// goes to the fsspec backend (with TensorFlow epath would pick tf.io.gfile).
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  orbax_root = tmp_path / "orbax_gs"
  save, restore = pc.save_sharded, pc.restore_sharded

  def local(directory):
    text = os.fspath(directory)
    assert not text.startswith("gs:/") or text.startswith("gs://"), text  # a URL, not a pathlib-mangled one
    return orbax_root / text.removeprefix("gs://") if text.startswith("gs://") else directory

  monkeypatch.setattr(pc, "save_sharded", lambda d, state, **kw: save(local(d), state, **kw))
  monkeypatch.setattr(pc, "restore_sharded", lambda d, target: restore(local(d), target))
  # Relative paths (and a pathlib "gs:" folder) would land here.
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)
  return fs, work, orbax_root


def test_gs_run_dir_kill_resume_outputs(tmp_path, bucket, capsys):
  fs, work, orbax_root = bucket
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), training={"checkpoint_every": 3})
  full = runner.run(C.from_dict(d), echo=None)  # the same stream, uninterrupted, in a local run_dir

  d["run_dir"] = REMOTE
  with pytest.raises(runner.RunInterrupted):
    runner.run(C.from_dict(d), echo=None, stop_after_steps=7)  # task 2, step 3
  # keep_checkpoints=2: step 3 was pruned from the bucket; the newest is mid-task 2.
  assert [p.name for p in ckpt_lib.list_checkpoints(REMOTE)] == ["step_00000004", "step_00000006"]
  assert fs.isfile("/fake-bucket/runs/r1/checkpoints/step_00000006/meta.json")
  assert fs.isfile("/fake-bucket/runs/r1/config.yaml")
  assert not fs.exists("/fake-bucket/runs/r1/results.json")
  assert (orbax_root / "fake-bucket/runs/r1/checkpoints/step_00000006/state").is_dir()  # Orbax got the URL
  # TensorBoard logs reach the bucket at each task boundary, before the run ends.
  assert fs.glob("/fake-bucket/runs/r1/tensorboard/events.out.tfevents*")

  resumed = runner.run(C.from_dict(d), echo=None, resume=True)
  np.testing.assert_allclose(resumed["R"], full["R"], atol=1e-6)
  np.testing.assert_allclose(resumed["R_initial"], full["R_initial"], atol=1e-6)
  assert resumed["global_steps"] == full["global_steps"] == 8

  base = "/fake-bucket/runs/r1"
  saved = json.loads(fs.cat_file(f"{base}/results.json"))
  np.testing.assert_allclose(saved["R"], full["R"], atol=1e-6)
  names, rows = outputs.read_r_csv(f"{REMOTE}/R.csv")
  assert names == ["low", "high"] and np.allclose(rows, full["R"], atol=1e-6)
  for png in outputs.PLOTS:
    assert fs.cat_file(f"{base}/{png}")[:8] == b"\x89PNG\r\n\x1a\n", png
  assert len(fs.glob(f"{base}/tensorboard/events.out.tfevents*")) == 2  # the killed run's and the resumed one's
  # The same files as a local run, byte for byte where nothing depends on timing.
  local = tmp_path / "run_osft"
  assert fs.cat_file(f"{base}/R.csv") == (local / "R.csv").read_bytes()

  # clsvd inspect reads the bucket too (and rewrites the plots there).
  capsys.readouterr()
  assert cli.main(["inspect", REMOTE]) == 0
  assert "R (accuracy %" in capsys.readouterr().out

  # Nothing went to the local disk under a mangled name ("gs:/fake-bucket/..."), nor anywhere in the cwd.
  assert not list(work.iterdir())
  assert not any("gs:" in p.name for p in tmp_path.rglob("*"))
