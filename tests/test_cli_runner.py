"""The ``clsvd`` command line: train (with --set), inspect, eval --checkpoint, demo plumbing, and error exits."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from clsvd_jax import cli
from clsvd_jax.train import demo

sys.path.insert(0, str(Path(__file__).parent / "train"))
from _train_helpers import TINY_MODEL, tiny_config_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_train_inspect_eval(tmp_path, capsys):
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), method="seqft")
  d.pop("run_dir")
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(d))
  run_dir = tmp_path / "out"
  assert cli.main(["train", str(path), "--set", "training.steps_per_task=3", "--run-dir", str(run_dir)]) == 0
  res = json.loads((run_dir / "results.json").read_text())
  assert res["config"]["training"]["steps_per_task"] == 3 and res["global_steps"] == 6
  assert (run_dir / "config.yaml").is_file()
  capsys.readouterr()

  assert cli.main(["inspect", str(run_dir)]) == 0
  out = capsys.readouterr().out
  assert "R (accuracy %" in out and "AA=" in out and "BWT=" in out and "low" in out
  assert "no protected subspaces" in out and "plots:" in out
  # Rank classification beside exact match (the synthetic tasks have label sets).
  assert "rank classification (accuracy %" in out and "rank_AA=" in out
  assert len(res["R_rank"]) == 2 and all(x is not None for x in res["R_rank"][-1])

  eval_out = tmp_path / "eval.json"
  assert cli.main(["eval", str(path), "--checkpoint", str(run_dir), "--out", str(eval_out)]) == 0
  got = json.loads(eval_out.read_text())
  assert got["tasks"] == ["low", "high"]
  # The newest checkpoint is the end of the run: the same accuracies as the last row of R.
  assert got["accuracy"] == pytest.approx(res["R"][-1])
  assert "step_00000006" in got["source"]


def test_error_exits(tmp_path, capsys):
  bad = tmp_path / "bad.yaml"
  bad.write_text(yaml.safe_dump({"model": {"config": {}, "tokenizer": "byt5"}, "tasks": [{"name": "a", "source":
                                                                                          "synthetic"}],
                                 "trainig": {"epochs": 1}}))
  assert cli.main(["train", str(bad)]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert "clsvd: error:" in err and "trainig: unknown key" in err and "training" in err
  assert cli.main(["train", str(tmp_path / "missing.yaml")]) == cli.EXIT_BAD_INPUT
  assert "not found" in capsys.readouterr().err
  assert cli.main(["inspect", str(tmp_path)]) == cli.EXIT_BAD_INPUT
  assert "results.json" in capsys.readouterr().err
  assert cli.main(["eval", str(bad)]) == cli.EXIT_BAD_INPUT


def test_demo_config_file_matches_the_builtin():
  on_disk = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
  assert on_disk == demo.DEMO_CONFIG


def test_demo_plumbing_on_a_tiny_model(tmp_path, monkeypatch, capsys):
  small = copy.deepcopy(demo.DEMO_CONFIG)
  small["model"] = copy.deepcopy(TINY_MODEL)
  small["tasks"] = [dict(t, max_train=16, max_eval=8) for t in small["tasks"][:2]]
  small["eval"] = {"batch_size": 8, "max_new_tokens": 4}
  small["training"]["batch_size"] = 4
  monkeypatch.setattr(demo, "DEMO_CONFIG", small)
  assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--quiet", "--seeds", "0,1"]) == 0
  out = capsys.readouterr().out
  assert "[seqft, mean over seeds 0, 1] R" in out and "[osft, mean over seeds 0, 1] R" in out and "BWT" in out
  summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
  assert set(summary) >= {"seqft", "osft", "seconds"}
  for method in ("seqft", "osft"):
    runs, mean = summary[method]["runs"], summary[method]["mean"]
    assert summary[method]["seeds"] == [0, 1] and len(runs) == 2
    # The printed figures are the mean over the seeds.
    assert mean["AA"] == pytest.approx(np.mean([r["AA"] for r in runs]))
    assert np.allclose(mean["R"], np.mean([r["R"] for r in runs], axis=0))
    assert (tmp_path / "demo" / method / "seed_1" / "results.json").is_file()
  # A seed is the model's initialisation and the data order.
  for seed in (0, 1):
    cfg = json.loads((tmp_path / "demo" / "osft" / f"seed_{seed}" / "results.json").read_text())["config"]
    assert cfg["model"]["init_seed"] == seed and cfg["training"]["seed"] == seed
  assert (tmp_path / "demo" / "osft" / "seed_0" / "protected_ranks.png").is_file()
  assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "a,b"]) == cli.EXIT_BAD_INPUT
  assert (tmp_path / "demo" / "data" / "SYN" / "low" / "train.json").is_file()


def test_inspect_memory_hook(capsys):
  assert cli.main(["inspect", "--memory", "llama-2-7b", "--accelerator", "v5p-64"]) == 0
  out = capsys.readouterr().out
  assert "Adam moments" in out and "subspace bases" in out
  assert cli.main(["inspect", "--memory", str(REPO / "configs" / "demo.yaml"), "--devices", "1"]) == 0
  assert "per device" in capsys.readouterr().out
  assert cli.main(["inspect", "--memory", "no-such-model"]) == cli.EXIT_BAD_INPUT
  assert "inspect --memory no-such-model" in capsys.readouterr().err


def test_run_dir_with_an_unknown_url_scheme_is_bad_input(capsys):
  assert cli.main(["inspect", "memory://bucket/run"]) == cli.EXIT_BAD_INPUT
  assert "unsupported URL scheme" in capsys.readouterr().err


def test_a_check_made_on_the_built_run_names_the_config_file(tmp_path, capsys):
  """osft.solver: randomized on a mesh is refused once the run knows its layout; the one-line error still names the
  file, the key and the fix, and nothing is written."""
  d = tiny_config_dict(tmp_path, osft={"solver": "randomized"}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
  path = tmp_path / "mesh.yaml"
  path.write_text(yaml.safe_dump(d))
  assert cli.main(["train", str(path)]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"clsvd: error: {path}: osft.solver: 'randomized' runs on one device")
  assert "set osft.solver: exact" in err[0]
  assert not Path(d["run_dir"]).exists()
