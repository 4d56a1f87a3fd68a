"""Runs and their folders: a run never writes over another, resumes from the newest usable checkpoint, says what it
does when there is nothing (or nothing more) to do, and reports bad folders and meshes in one line."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from _train_helpers import tiny_config_dict

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import runner
from clsvd_jax.train.run_state import loss_window

STEPS = 20  # per task: a loss window (the last tenth) of 2 steps, so a kill can fall inside it


def _config(tmp, run_dir, **training):
  d = tiny_config_dict(tmp, tasks=("low", "high"), method="seqft",
                       training={"steps_per_task": STEPS, "checkpoint_every": 13, "keep_checkpoints": 10, **training})
  d["eval"] = {"batch_size": 8, "max_new_tokens": 4, "initial": False}
  d["tasks"] = [dict(t, max_eval=4) for t in d["tasks"]]
  d["run_dir"] = str(run_dir)
  return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted 2-task run: checkpoints at global steps 13, 20 (end of task 1), 26, 39 and 40 (the end)."""
  tmp = tmp_path_factory.mktemp("runs")
  d = _config(tmp, tmp / "full")
  res = runner.run(C.from_dict(d), echo=None)
  assert [p.name for p in ckpt_lib.list_checkpoints(d["run_dir"])] == [
    f"step_{s:08d}" for s in (13, 20, 26, 39, 40)]
  return tmp, d, res


def _copy(finished, name):
  tmp, d, res = finished
  d2 = json.loads(json.dumps(d))
  d2["run_dir"] = str(tmp / name)
  shutil.rmtree(d2["run_dir"], ignore_errors=True)
  shutil.copytree(d["run_dir"], d2["run_dir"])
  return d2


def _yaml(tmp, d, name="cfg.yaml"):
  path = Path(tmp) / name
  path.write_text(yaml.safe_dump(d))
  return str(path)


def test_a_kill_inside_the_loss_window_reports_the_uninterrupted_train_loss(finished):
  tmp, d, full = finished
  assert loss_window(STEPS) == 2
  k = json.loads(json.dumps(d))
  k["run_dir"] = str(tmp / "killed")
  # 39 steps: the checkpoint after global step 39 holds task 2's step 19 of 20, the first of its 2-step window.
  with pytest.raises(runner.RunInterrupted):
    runner.run(C.from_dict(k), echo=None, stop_after_steps=39)
  assert ckpt_lib.latest_checkpoint(k["run_dir"]).name == "step_00000039"
  resumed = runner.run(C.from_dict(k), echo=None, resume=True)
  assert resumed["train_loss"] == full["train_loss"]
  assert resumed["R"] == full["R"] and resumed["global_steps"] == 40
  assert resumed["train_tokens"] == full["train_tokens"]
  assert resumed["train_seen_tokens"] == full["train_seen_tokens"]


@pytest.mark.parametrize("damage", ["array", "meta"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(finished, damage):
  d = _copy(finished, f"damaged_{damage}")
  newest = Path(d["run_dir"]) / "checkpoints" / "step_00000040"
  if damage == "array":
    big = max((p for p in (newest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  else:
    meta = newest / "meta.json"
    meta.write_bytes(meta.read_bytes()[:100])
  lines = []
  resumed = runner.run(C.from_dict(d), echo=lines.append, resume=True)
  note = next(x for x in lines if "unusable" in x)
  assert "step_00000040" in note and "using the older" in note and "step_00000039" in note
  assert any(x.startswith("resumed from") and "step_00000039" in x for x in lines)
  _, _, full = finished
  assert resumed["R"] == full["R"] and resumed["train_loss"] == full["train_loss"]


def test_eval_checkpoint_falls_back_too_and_says_so(finished, capsys):
  tmp, _, _ = finished
  d = _copy(finished, "damaged_eval")
  meta = Path(d["run_dir"]) / "checkpoints" / "step_00000040" / "meta.json"
  meta.write_text("{")
  out = tmp / "eval.json"
  assert cli.main(["eval", _yaml(tmp, d, "eval.yaml"), "--checkpoint", d["run_dir"], "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "step_00000040" in printed and "is damaged" in printed and "using the older" in printed
  assert json.loads(out.read_text())["source"].endswith("step_00000039")
  # A damaged checkpoint given by name is not replaced by another: one line naming it.
  chosen = Path(d["run_dir"]) / "checkpoints" / "step_00000026"
  big = max((p for p in (chosen / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:100])
  for ckpt, words in ((meta.parent, "is damaged"), (chosen, "its arrays cannot be read")):
    assert cli.main(["eval", _yaml(tmp, d, "eval.yaml"), "--checkpoint", str(ckpt)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and ckpt.name in err


def test_every_checkpoint_damaged_is_one_line_naming_them(finished, capsys):
  tmp, _, _ = finished
  d = _copy(finished, "all_damaged")
  for ckpt in ckpt_lib.list_checkpoints(d["run_dir"]):
    (Path(ckpt) / "meta.json").write_text("[1, 2")
  code = cli.main(["train", _yaml(tmp, d, "damaged.yaml"), "--resume"])
  err = capsys.readouterr().err
  assert code == cli.EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1
  assert "no usable checkpoint" in err and "step_00000013" in err and "step_00000040" in err


def test_a_finished_run_resumed_says_it_is_finished(finished):
  d = _copy(finished, "resume_finished")
  lines = []
  res = runner.run(C.from_dict(d), echo=lines.append, resume=True)
  assert any("is finished (2/2 stages" in x and "nothing to resume" in x for x in lines), lines
  assert not any("3/2" in x for x in lines)
  assert res["R"] == finished[2]["R"] and res["global_steps"] == 40


def test_resume_with_nothing_to_resume_says_so(tmp_path):
  d = _config(tmp_path, tmp_path / "new", steps_per_task=2)
  lines = []
  res = runner.run(C.from_dict(d), echo=lines.append, resume=True)
  assert any("no checkpoint in" in x and "starting from the beginning" in x for x in lines), lines
  assert res["global_steps"] == 4


def test_a_run_dir_with_files_is_refused_and_left_alone(finished, capsys):
  tmp, _, _ = finished
  d = _copy(finished, "occupied")
  before = (Path(d["run_dir"]) / "results.json").read_bytes()
  with pytest.raises(C.ConfigError, match=r"already holds files \(R.csv, .*--resume.*--overwrite"):
    runner.run(C.from_dict(d), echo=None)
  assert cli.main(["train", _yaml(tmp, d, "occupied.yaml")]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
  assert (Path(d["run_dir"]) / "results.json").read_bytes() == before
  assert ckpt_lib.latest_checkpoint(d["run_dir"]).name == "step_00000040"


def test_overwrite_clears_the_old_run_first(finished):
  tmp, _, _ = finished
  d = _copy(finished, "overwritten")
  (Path(d["run_dir"]) / "tensorboard" / "old.txt").write_text("old")
  path = _yaml(tmp, d, "overwrite.yaml")
  assert cli.main(["train", path, "--overwrite", "--set", "training.steps_per_task=2"]) == 0
  # The old run's checkpoints (steps 13..40) would sort after the new ones and be kept: they are gone.
  assert [p.name for p in ckpt_lib.list_checkpoints(d["run_dir"])] == ["step_00000002", "step_00000004"]
  assert not (Path(d["run_dir"]) / "tensorboard" / "old.txt").exists()
  assert json.loads((Path(d["run_dir"]) / "results.json").read_text())["global_steps"] == 4
  assert cli.main(["train", path, "--overwrite", "--resume"]) == cli.EXIT_BAD_INPUT


def test_run_dir_that_is_a_file_or_below_one(tmp_path, capsys):
  f = tmp_path / "a_file"
  f.write_text("x")
  for run_dir, words in ((f, "is a file"), (f / "run", "lies below")):
    d = _config(tmp_path, run_dir, steps_per_task=2)
    assert cli.main(["train", _yaml(tmp_path, d)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "run_dir" in err
  assert f.read_text() == "x"


def test_a_mesh_larger_than_the_devices_is_one_line_and_leaves_no_folder(tmp_path, capsys):
  d = _config(tmp_path, tmp_path / "mesh_run", steps_per_task=2)
  d["mesh"] = {"data": 1, "fsdp": 64, "tensor": 1}
  assert cli.main(["train", _yaml(tmp_path, d)]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "needs 64 devices" in err and "mesh" in err
  assert not (tmp_path / "mesh_run").exists()


def test_a_failed_config_leaves_no_run_dir(tmp_path):
  # Bad data fails before the folder is made; a policy that trains nothing fails after, and the folder goes.
  d = _config(tmp_path, tmp_path / "bad_data", steps_per_task=2)
  d["tasks"][1] = {"name": "x", "source": "cl_benchmark", "path": str(tmp_path / "nope")}
  with pytest.raises(Exception, match="cannot be read|not a folder|not found"):
    runner.run(C.from_dict(d), echo=None)
  assert not (tmp_path / "bad_data").exists()
  d = _config(tmp_path, tmp_path / "bad_policy", steps_per_task=2)
  # osft (seqft trains everything whatever the policy); default freeze: osft's own default for a model built from
  # scratch trains the non-matrix parameters.
  d["method"] = "osft"
  d["osft"]["param_policy"] = {"constrain": ["nothing_matches$"], "default": "freeze"}
  with pytest.raises(Exception, match="no parameter is constrained or trained"):
    runner.run(C.from_dict(d), echo=None)
  assert not (tmp_path / "bad_policy").exists()
