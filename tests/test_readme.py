"""The README's code blocks run as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
  assert len(_python_blocks()) >= 1


def test_readme_optimizer_example_runs():
  block = _python_blocks()[0]
  assert "cj.constrained" in block
  exec(compile(block, str(README), "exec"), {})


def test_readme_commands_exist_in_makefile_and_ci():
  makefile = (README.parent / "Makefile").read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  assert re.search(r"^test:", makefile, re.M) and re.search(r"^demo:", makefile, re.M)
  assert "make test" in ci
  assert "make demo" in README.read_text() and "make test" in README.read_text()


def test_benchmark_script_runs_on_a_tiny_stack():
  out = subprocess.run(
      [sys.executable, str(README.parent / "benchmarks" / "overhead.py"), "--d", "16", "--layers", "1", "--tokens",
       "64", "--repeats", "1", "--protected", "0.5"],
      capture_output=True, text=True, check=True, timeout=300)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(row) >= {"protected", "step_ratio", "state_ratio"}
  assert row["protected"] == 0.5 and row["step_ratio"] > 0 and 2.0 < row["state_ratio"] < 3.2
