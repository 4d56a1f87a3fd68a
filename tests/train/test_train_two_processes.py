"""The runner on two processes (jax.distributed on localhost, 4 CPU devices each, one (2,2,2) mesh over all 8):
each host feeds its own rows of every training batch, and a run killed mid-stream and continued with
``clsvd train --resume`` equals the uninterrupted single-process run. Only process 0 prints and writes outputs.

One launch covers both the two-process run and its kill / resume: compiling the 8-device programs twice on two
cores is the cost of this test, so the uninterrupted two-process run is left to the transitive argument (resumed
== single process, and resume == uninterrupted is tested on one process and on the 8-device mesh).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.parallel import distributed
from clsvd_jax.train import outputs, runner

ROOT = Path(__file__).resolve().parents[2]

WORKER = r"""
import sys
from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.parallel import distributed
from clsvd_jax.train import context, outputs, runner
from clsvd_jax.train.phases import start, train_task

cfg_path = sys.argv[1]
cfg = C.load_config(cfg_path)
distributed.initialize_from_env(cfg.distributed.init_kwargs())


# Markers: which process writes outputs and opens a TensorBoard log.
def _marked(fn, what):
  def wrapper(*args, **kwargs):
    print(f"WROTE {what}", flush=True)
    return fn(*args, **kwargs)
  return wrapper


outputs.write_outputs = _marked(outputs.write_outputs, "outputs")
start.dump_config = _marked(start.dump_config, "config")


class Writer(context.Writer):
  def __init__(self, run_dir, enabled=True):
    if enabled:
      print("WROTE tensorboard", flush=True)
    super().__init__(run_dir, enabled=enabled)


context.Writer = Writer


# Which rows of each training batch this host reads (its share, not the whole batch).
class Iterator(train_task.BatchIterator):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if "position" in kwargs:  # the training stream (calibration batches are read whole on purpose)
      print(f"TRAIN ROWS {self.process_index}/{self.process_count}", flush=True)


train_task.BatchIterator = Iterator
try:
  runner.run(cfg, stop_after_steps=int(sys.argv[2]))
except runner.RunInterrupted:
  print("INTERRUPTED", flush=True)
sys.exit(cli.main(["train", cfg_path, "--resume"]))
"""


def _launch(tmp_path: Path, cfg_path: Path, stop_after: int) -> list[subprocess.Popen]:
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = distributed.free_local_port()
  procs = []
  for pid in range(2):
    # Optimisation level 0: the CPU programs compile faster (numerics stay within the test's tolerances).
    env = distributed.local_process_env(pid, 2, port, devices_per_process=4,
                                        xla_flags="--xla_backend_optimization_level=0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    procs.append(subprocess.Popen([sys.executable, str(script), str(cfg_path), str(stop_after)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path)))
  return procs


def test_two_processes_killed_and_resumed_equal_single_process(tmp_path):
  d = tiny_config_dict(tmp_path)
  d["training"]["checkpoint_every"] = 3
  multi = json.loads(json.dumps(d))
  multi["run_dir"] = str(tmp_path / "two_processes")
  multi["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
  multi["training"]["progress"] = True  # bars on process 0 only
  cfg_path = tmp_path / "two_processes.yaml"
  cfg_path.write_text(yaml.safe_dump(multi))
  procs = _launch(tmp_path, cfg_path, stop_after=7)
  try:
    # The single-process reference runs here meanwhile (the workers spend their first seconds starting up).
    reference = runner.run(C.from_dict(d), echo=None)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  outs = distributed.wait_all(procs, timeout=600)
  for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {pid} failed (rc {p.returncode}):\n{out[-3000:]}\n{err[-6000:]}"
    assert "INTERRUPTED" in out, f"process {pid} was not interrupted:\n{out[-3000:]}"

  # Only process 0 reports and writes (config, TensorBoard, results); both took part in the checkpoints.
  out0, out1 = outs[0][0], outs[1][0]
  assert "R (accuracy %)" in out0 and "results in" in out0 and "resumed from" in out0
  assert "R (accuracy %)" not in out1 and "results in" not in out1 and "resumed from" not in out1
  assert "WROTE outputs" in out0 and "WROTE config" in out0 and "WROTE tensorboard" in out0
  assert "WROTE" not in out1, out1
  assert "TRAIN ROWS 0/2" in out0 and "TRAIN ROWS 1/2" in out1 and "TRAIN ROWS 0/1" not in out0 + out1
  assert "task 1/3" in outs[0][1] and "task 1/3" not in outs[1][1], "progress bars on process 0 only"
  run_dir = Path(multi["run_dir"])
  assert [p.relative_to(run_dir) for p in run_dir.rglob(outputs.RESULTS)] == [Path(outputs.RESULTS)]

  got = outputs.read_results(multi["run_dir"])
  assert got["global_steps"] == reference["global_steps"] == 12
  assert got["R"] == reference["R"] and got["R_initial"] == reference["R_initial"]
  assert got["ranks"] == reference["ranks"]
  assert len(got["train_loss"]) == len(reference["train_loss"]) == 3
  for a, b in zip(got["train_loss"], reference["train_loss"]):
    assert abs(a - b) <= 1e-5 * abs(b), (got["train_loss"], reference["train_loss"])
  assert got["invariant_max"] <= 1e-5 and reference["invariant_max"] <= 1e-5
