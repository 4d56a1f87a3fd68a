"""Regression test of the task-boundary hang (issue 8): three protected boundaries with the activations basis at
``configs/cpu_small.yaml``'s matrix sizes in one process, two such processes at once on two CPUs, under a timeout.
Before ``clsvd_jax._src.linalg`` ran each decomposition unbatched on CPU, this stopped at 0% CPU in most tries."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = Path(__file__).with_name("_boundary_worker.py")


def test_three_protected_boundaries_twice_at_once_finish():
  procs = [subprocess.Popen([sys.executable, str(WORKER), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=480)
      results.append((p.returncode, out, err[-2000:]))
  finally:
    for p in procs:
      p.kill()
  for code, out, err in results:
    assert code == 0 and out.startswith("ok"), (code, out, err)
