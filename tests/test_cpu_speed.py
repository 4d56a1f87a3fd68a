"""benchmarks/cpu_speed.py runs end to end on a tiny model (its figures belong in the issue note, not in a test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_speed.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cpu_speed_quick_reports_both_frameworks():
  out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, check=True)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["rounds"] == 2 and row["threads"] == 1
  assert list(row["median_step_s"]) == ["torch", "jax"] and min(row["median_step_s"].values()) > 0
  r = row["ratio_over_torch"]["jax"]
  assert r["iqr"][0] <= r["median"] <= r["iqr"][1]
