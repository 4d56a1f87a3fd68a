"""Two processes (jax.distributed on localhost, 4 CPU devices each, one (2,2,2) mesh over all 8): each host feeds its
own rows of the batch; the result equals the single-process run (checked by process 0 inside
``python -m clsvd_jax.parallel.selfcheck``), and the Orbax checkpoint both hosts wrote together restores onto one
device with the same values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clsvd_jax import flatten_with_paths
from clsvd_jax.parallel import checkpoint, distributed, selfcheck

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_agree_with_one(tmp_path):
  port = distributed.free_local_port()
  procs = []
  for pid in range(2):
    env = distributed.local_process_env(pid, 2, port, devices_per_process=4)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "clsvd_jax.parallel.selfcheck", "--mesh", "data=2,fsdp=2,tensor=2", "--tol", "1e-5",
           "--checkpoint", str(tmp_path / "ckpt"), "--dump", str(tmp_path / "params.npz"),
           "--report", str(tmp_path / "report.json")]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = distributed.wait_all(procs, timeout=600)
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"process failed (rc {p.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["processes"] == 2 and report["devices"] == 8
  assert report["ok"] and report["errors"] == [], report["errors"]
  assert '"ok"' in outs[0][0] and '"ok"' not in outs[1][0], "only process 0 prints the report"

  # The checkpoint written by both hosts restores in this single-device process.
  problem = selfcheck.problem_for_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract_params = jax.eval_shape(lambda: problem.params)
  target = {"params": checkpoint.abstract_state(abstract_params, jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            "opt_state": checkpoint.abstract_state(jax.eval_shape(problem.tx.init, problem.params),
                                                   jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  restored = checkpoint.restore_sharded(tmp_path / "ckpt", target)
  dumped = np.load(tmp_path / "params.npz")
  params = flatten_with_paths(restored["params"])
  assert set(params) == set(dumped.files)
  for path, x in params.items():
    np.testing.assert_array_equal(np.asarray(x), dumped[path], err_msg=path)
