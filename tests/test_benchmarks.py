"""The benchmark scripts run as a user runs them (toy sizes): they finish, print what they promise, and the figures
that do not depend on timing hold (leaks, memory ratios, fallbacks). Timings themselves are never asserted.

``overhead.py``'s smoke test is ``tests/test_readme.py::test_benchmark_script_runs_on_a_tiny_stack``."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args, timeout=600):
  out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _module(name):
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_gpu_script_tiny_runs_every_part():
  result = json.loads(_run("gpu.py", "--tiny").strip().splitlines()[-1])
  assert result["tiny"] and not result["skipped"]
  tp = result["throughput"]
  assert tp["params"] > 0 and tp["model_flops_per_step"] > 0
  for name in ("plain", "constrained_0.5"):
    assert tp[name]["step_s"] > 0 and tp[name]["tokens_per_s"] > 0
    assert tp[name]["held_state_bytes"] > 0
  # The constrained state holds the bases on top of AdamW's.
  assert tp["constrained_0.5"]["held_state_bytes"] > tp["plain"]["held_state_bytes"]
  precision = {r["precision"]: r for r in result["precision"]}
  assert precision["HIGHEST"]["single_leak"] < 1e-5
  if result["backend"] == "cpu":
    assert "error" in precision["TF32_TF32_F32_X3"]  # a CPU refuses it; the script records that and goes on
  row = result["boundary"]["matrices"][0]
  assert row["fallback_qr_exact_fallback"] and not row["randomized_0.1_exact_fallback"]
  assert all(row[f"{label}_second_s"] > 0 for label in ("exact", "fallback_qr", "randomized_0.1"))


def test_peers_quick_compares_each_framework_with_its_own_plain_run():
  peers = _module("peers")
  rows = [json.loads(line) for line in _run("peers.py", "--quick", "--fractions", "0.5", "--json").splitlines()]
  ours = {r["method"]: r for r in rows if r["framework"] == "jax"}
  assert set(ours) == {"plain adamw", "constrained(adamw)"}
  con = ours["constrained(adamw)"]
  assert con["step_ratio"] > 0 and con["setup_s"] > 0
  assert con["leak"] < 1e-5 and con["leak_right"] < 1e-5  # exact up to float32 rounding
  # Protecting half of every targeted matrix costs one basis per side of half its width: at most 1x the targets.
  assert con["memory_ratio"] < ours["plain adamw"]["memory_ratio"] + 1.0
  if peers.peer_available():
    peer = {r["method"]: r for r in rows if r["framework"] == "torch"}
    assert set(peer) == {"plain AdamW", "peft OSF"}
    assert peer["peft OSF"]["leak"] > 1e-3  # Adam's scaling of the factors leaks into the preserved span
    assert con["memory_ratio"] < peer["peft OSF"]["memory_ratio"]
  table = peers.markdown(rows)
  assert table.count("\n") == len(rows) + 1 and "constrained(adamw) | 50%" in table
  # make bench's summary: our rows against the targets; the leak row says the target is met.
  summary = _module("report").table({"peers": rows})
  leak_row = next(line for line in summary.splitlines() if line.startswith("| peers | leak after 3 steps, 50%"))
  assert leak_row.endswith("| <= 1e-5 | yes |")


@pytest.mark.multiprocess
def test_report_args_replace_one_benchmarks_arguments_and_name_them(tmp_path):
  report = _module("report")
  tiny = "--d 16 --layers 1 --tokens 64 --repeats 1 --protected 0.5"
  text = report.main(["--only", "overhead", "--out", str(tmp_path), "--args", f"overhead={tiny}"])
  # The replaced arguments reached the script (one fraction, not the default three) and the header says so.
  rows = [json.loads(line) for line in (tmp_path / "overhead.jsonl").read_text().splitlines()]
  assert [r["protected"] for r in rows] == [0.5] and rows[0]["d"] == 16 and rows[0]["layers"] == 1
  assert f"overhead.py {tiny}" in text.splitlines()[0]
  assert (tmp_path / "table.md").read_text().strip() == text.strip()


def test_report_args_name_an_unknown_benchmark_in_a_one_line_error(capsys):
  report = _module("report")
  with pytest.raises(SystemExit) as exit_info:
    report.main(["--args", "nosuch=--x"])
  assert exit_info.value.code == 2
  assert "--args 'nosuch=--x': expected NAME=ARGS with NAME one of peers" in capsys.readouterr().err
