"""The runner on an 8-device CPU mesh (2 data x 2 fsdp x 2 tensor) equals the single-device run; resume works
onto the mesh. In-process: tests/conftest.py gives the suite 8 host devices."""

import json

import jax
import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.train import runner

pytestmark = pytest.mark.slow

KEYS = ("R", "train_loss", "invariant_max", "ranks")


def _run(d, **kw):
  result = runner.run(C.from_dict(d), echo=None, **kw)
  return {key: result[key] for key in KEYS}


def test_mesh_run_equals_single_device(tmp_path):
  assert jax.device_count() == 8, f"the mesh run needs 8 devices (tests/conftest.py sets them), got {jax.devices()}"
  d = tiny_config_dict(tmp_path)
  single = _run(d)
  m = json.loads(json.dumps(d))
  m["run_dir"] = str(tmp_path / "mesh")
  m["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
  mesh = _run(m)
  k = json.loads(json.dumps(m))
  k["run_dir"] = str(tmp_path / "killed")
  k["training"]["checkpoint_every"] = 3
  with pytest.raises(runner.RunInterrupted):
    runner.run(C.from_dict(k), echo=None, stop_after_steps=7)
  resumed = _run(k, resume=True)
  # The subprocess version compared JSON-encoded results: keep the comparison on JSON values.
  single, mesh, resumed = (json.loads(json.dumps(r)) for r in (single, mesh, resumed))
  assert mesh["R"] == single["R"] and resumed["R"] == mesh["R"]
  assert mesh["ranks"] == single["ranks"] == resumed["ranks"]
  for a, b in zip(mesh["train_loss"], single["train_loss"]):
    assert abs(a - b) <= 1e-5 * abs(b)
  assert resumed["train_loss"] == mesh["train_loss"]
  assert mesh["invariant_max"] <= 1e-5 and resumed["invariant_max"] <= 1e-5
