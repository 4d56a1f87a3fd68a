"""The runner on an 8-device CPU mesh (2 data x 2 fsdp x 2 tensor) equals the single-device run; resume works
onto the mesh. Runs in a subprocess: the device count must be set before JAX starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {helpers!r})
from _train_helpers import tiny_config_dict
from clsvd_jax import config as C
from clsvd_jax.train import runner
import jax
assert jax.device_count() == 8, jax.device_count()
tmp = Path({tmp!r})
d = tiny_config_dict(tmp)
single = runner.run(C.from_dict(d), echo=None)
m = json.loads(json.dumps(d)); m["run_dir"] = str(tmp / "mesh"); m["mesh"] = {{"data": 2, "fsdp": 2, "tensor": 2}}
meshed = runner.run(C.from_dict(m), echo=None)
k = json.loads(json.dumps(m)); k["run_dir"] = str(tmp / "killed"); k["training"]["checkpoint_every"] = 3
try:
  runner.run(C.from_dict(k), echo=None, stop_after_steps=7)
except runner.RunInterrupted:
  pass
resumed = runner.run(C.from_dict(k), echo=None, resume=True)
keys = ("R", "train_loss", "invariant_max", "ranks")
print("RESULT " + json.dumps({{n: {{key: r[key] for key in keys}} for n, r in
                               (("single", single), ("mesh", meshed), ("resumed", resumed))}}))
"""


def test_mesh_run_equals_single_device(tmp_path):
  script = tmp_path / "mesh_run.py"
  script.write_text(SCRIPT.format(helpers=str(Path(__file__).parent), tmp=str(tmp_path)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  res = json.loads(line[len("RESULT "):])
  single, mesh, resumed = res["single"], res["mesh"], res["resumed"]
  assert mesh["R"] == single["R"] and resumed["R"] == mesh["R"]
  assert mesh["ranks"] == single["ranks"] == resumed["ranks"]
  for a, b in zip(mesh["train_loss"], single["train_loss"]):
    assert abs(a - b) <= 1e-5 * abs(b)
  assert resumed["train_loss"] == mesh["train_loss"]
  assert mesh["invariant_max"] <= 1e-5 and resumed["invariant_max"] <= 1e-5
