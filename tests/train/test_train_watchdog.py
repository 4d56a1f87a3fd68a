"""The watchdog: a boundary or a step that makes no progress stops the run with a message naming the phase and the
last checkpoint, in the process (the stall returns to Python) or by ending the process (it does not)."""

import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from _train_helpers import tiny_config_dict

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.train import layout as layout_lib
from clsvd_jax.train import runner, watchdog
from clsvd_jax.train import scheduler as sched_lib

TIMEOUT = 5  # seconds: far below the stalls injected here, above anything a warm tiny run does on a busy machine


def _config(tmp, name, **training):
  d = tiny_config_dict(tmp, tasks=("low", "high"), training={"steps_per_task": 4, **training})
  d["eval"]["initial"] = False
  d["run_dir"] = str(tmp / name)
  return d


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
  """The same stream run once unwatched: every program is compiled, so the watched runs below never wait on the
  compiler (whose first step legitimately takes long: the default timeout is an hour)."""
  tmp = tmp_path_factory.mktemp("watchdog")
  runner.run(C.from_dict(_config(tmp, "warm")), echo=None)
  return tmp


def test_a_stalled_boundary_stops_the_run_naming_it(warm, monkeypatch, capsys):
  real = sched_lib.TaskScheduler.before_task

  def stalled(self, task_index, *args, **kwargs):
    if task_index == 1:
      time.sleep(120)
    return real(self, task_index, *args, **kwargs)

  monkeypatch.setattr(sched_lib.TaskScheduler, "before_task", stalled)
  d = _config(warm, "stalled_boundary", watchdog_seconds=TIMEOUT)
  path = warm / "stalled.yaml"
  path.write_text(yaml.safe_dump(d))
  t0 = time.monotonic()
  assert cli.main(["train", str(path)]) == cli.EXIT_STALLED
  assert time.monotonic() - t0 < 60
  err = capsys.readouterr().err
  assert "no progress for" in err and f"(training.watchdog_seconds={TIMEOUT}) in the boundary" in err
  assert "in the boundary before task 2/2 (high); the last checkpoint is" in err and "step_00000004" in err
  assert "--resume" in err
  assert not (warm / "stalled_boundary" / "results.json").exists()


def test_a_stalled_step_stops_the_run_naming_it(warm, monkeypatch):
  real = layout_lib.Layout.put_batch
  calls = []

  def stalled(self, batch):
    calls.append(1)
    if len(calls) == 3:
      time.sleep(120)
    return real(self, batch)

  monkeypatch.setattr(layout_lib.Layout, "put_batch", stalled)
  d = _config(warm, "stalled_step", watchdog_seconds=TIMEOUT)
  with pytest.raises(watchdog.RunStalled, match=r"in step 3/4 of task 1/2 \(low\); no checkpoint was written yet"):
    runner.run(C.from_dict(d), echo=None)


HARD = """
import signal, sys, time
from clsvd_jax.train import watchdog

dog = watchdog.Watchdog(0.5, lambda: "the last checkpoint is /x/step_7", grace=1.0)
with dog:
  dog.beat("step 3 of task 1")
  # The main thread never runs Python again until the sleep ends (as when it waits inside native code):
  # the stall signal stays pending, so only ending the process stops it.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
  time.sleep(60)
print("not stopped")
"""


def test_a_process_stuck_in_native_code_is_ended_with_status_5(tmp_path):
  script = tmp_path / "hard.py"
  script.write_text(textwrap.dedent(HARD))
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == watchdog.EXIT_STALLED == cli.EXIT_STALLED, proc.stderr
  assert time.monotonic() - t0 < 50
  assert "not stopped" not in proc.stdout
  assert "in step 3 of task 1; the last checkpoint is /x/step_7" in proc.stderr
  assert "did not stop within 1 s" in proc.stderr
