"""Bad input refuses to start with a clear message; a non-finite loss stops the run and keeps the last checkpoint."""

import json
import os
import signal

import jax.numpy as jnp
import pytest
import yaml
from _train_helpers import tiny_config_dict

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import runner
from clsvd_jax.train import step as step_lib


def _bench(root, *, train=None, labels=("pos", "neg"), test=None):
  """A one-task CL_Benchmark folder SC/mini with the given records."""
  task = root / "SC" / "mini"
  task.mkdir(parents=True)
  (root / "instruction_config.json").write_text(json.dumps({"SC": [{"instruction_type": "zero-shot",
                                                                    "instruction": "Sentiment?\n"}]}))
  (task / "labels.json").write_text(json.dumps(list(labels)))
  train = train if train is not None else [{"label": "pos", "sentence": "good"}, {"label": "neg", "sentence": "bad"}]
  (task / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
  (task / "test.json").write_text(json.dumps(test if test is not None else train))
  return root


def _mini(tmp_path, **sections):
  d = tiny_config_dict(tmp_path, tasks=("mini",), **sections)
  d["tasks"] = [{"name": "mini", "source": "cl_benchmark", "path": str(tmp_path / "bench")}]
  return d


def _prepare(d):
  return runner.prepare(C.from_dict(d))


def test_missing_data_folder_names_the_task(tmp_path):
  with pytest.raises(DataError, match=r"task 'mini'.*(not a folder|not found)"):
    _prepare(_mini(tmp_path))


def test_malformed_json_names_file_and_line(tmp_path):
  _bench(tmp_path / "bench", train='[\n{"label": "pos", "sentence": "a"},\n{"label": "neg" "sentence": "b"}\n]')
  with pytest.raises(DataError, match=r"train\.json:3:\d+: malformed JSON"):
    _prepare(_mini(tmp_path))


def test_label_outside_labels_json(tmp_path):
  _bench(tmp_path / "bench", train=[{"label": "meh", "sentence": "so so"}])
  with pytest.raises(DataError, match=r"record 0 has label 'meh', which is not in .*labels\.json"):
    _prepare(_mini(tmp_path))


def test_empty_split(tmp_path):
  _bench(tmp_path / "bench", train=[], test=[{"label": "pos", "sentence": "x"}])
  with pytest.raises(DataError, match=r"'train' split of task 'mini' is empty"):
    _prepare(_mini(tmp_path))


def test_every_bad_task_is_reported_before_training(tmp_path):
  d = tiny_config_dict(tmp_path)
  d["tasks"][1] = {"name": "x1", "source": "cl_benchmark", "path": str(tmp_path / "nope1")}
  d["tasks"][2] = {"name": "x2", "source": "cl_benchmark", "path": str(tmp_path / "nope2")}
  with pytest.raises(DataError, match=r"2 tasks cannot be read:(.|\n)*x1(.|\n)*x2"):
    runner.run(C.from_dict(d), echo=None)
  assert not (tmp_path / "run_osft" / "checkpoints").exists()


def test_long_examples_are_truncated_and_counted(tmp_path):
  _bench(tmp_path / "bench", train=[{"label": "pos", "sentence": "word " * 200}, {"label": "neg", "sentence": "b"}])
  p = _prepare(_mini(tmp_path))
  assert p.train_splits[0].truncated_prompts == 1
  assert all(len(e.prompt_ids) <= 128 for e in p.train_splits[0].examples)
  assert any("1 prompts truncated" in n for n in p.notes)


def test_vocab_too_small_and_missing_tokenizer(tmp_path):
  d = tiny_config_dict(tmp_path)
  d["model"]["config"]["vocab_size"] = 100
  with pytest.raises(C.ConfigError, match="vocab_size=100 but the tokenizer has 384 tokens"):
    _prepare(d)
  d = tiny_config_dict(tmp_path)
  d["model"]["tokenizer"] = str(tmp_path / "no_tokenizer")
  with pytest.raises(C.ConfigError, match="model.tokenizer=.*no such directory"):
    _prepare(d)


def test_policy_that_trains_nothing(tmp_path):
  d = tiny_config_dict(tmp_path, osft={"param_policy": {"constrain": ["nothing_matches$"]}})
  with pytest.raises(DataError, match="osft.param_policy: no parameter is constrained or trained"):
    runner.run(C.from_dict(d), echo=None)


def _stopped_run(tmp_path, **optimizer):
  """Runs a 2-task seqft stream (checkpoint every step) that must stop; returns the run dict and the message."""
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), method="seqft", optimizer=optimizer,
                       training={"checkpoint_every": 1, "steps_per_task": 4})
  d["eval"]["initial"] = False
  with pytest.raises(runner.TrainingError) as e:
    runner.run(C.from_dict(d), echo=None)
  msg = str(e.value)
  assert "non-finite loss" in msg and "task 1 (low)" in msg and "--resume" in msg
  assert not (tmp_path / "run_seqft" / "results.json").exists()
  return d, msg


def test_non_finite_update_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  # A NaN learning rate at the third step of task 1 makes that step's update non-finite, deterministically on any
  # machine (a huge learning rate overflows at a step that depends on the platform's float behaviour).
  real_schedule = step_lib.lr_schedule
  monkeypatch.setattr(step_lib, "lr_schedule",
                      lambda s: (lambda count: jnp.where(count == 2, jnp.nan, real_schedule(s)(count))))
  d, msg = _stopped_run(tmp_path)
  assert "at step 3 of task 1 (low)" in msg
  last = ckpt_lib.latest_checkpoint(d["run_dir"])
  assert last is not None and last.name == "step_00000002" and str(last) in msg
  meta = ckpt_lib.read_meta(last)
  assert meta["run"]["global_step"] == meta["global_step"] == 2


def test_diverging_loss_stops_with_a_clear_error(tmp_path):
  d, msg = _stopped_run(tmp_path, lr=1e30, clip_norm=None)
  last = ckpt_lib.latest_checkpoint(d["run_dir"])
  assert (str(last) in msg) if last is not None else ("no checkpoint was written yet" in msg)


def test_missing_model_path_is_reported_as_model_path(tmp_path):
  d = tiny_config_dict(tmp_path)
  d["model"] = {"path": "no_such_checkpoint"}
  d["data_dir"] = str(tmp_path)
  with pytest.raises(C.ConfigError, match=r"model\.path=no_such_checkpoint: no such folder \(looked at "):
    _prepare(d)


def test_nan_learning_rate_from_the_command_line_is_one_line(tmp_path, capsys):
  d = tiny_config_dict(tmp_path)
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(d))
  assert cli.main(["train", str(path), "--set", "optimizer.lr=.nan"]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "optimizer.lr: must be a finite number, got nan" in err
  assert not (tmp_path / "run_osft").exists()


def test_max_length_that_cuts_most_prompts_is_an_error_with_the_fix(tmp_path):
  # 3 of 4 prompts too long: 75% > the share allowed (0.5 here, 0.9 by default) -> refused, naming the fix.
  long, short = {"label": "pos", "sentence": "word " * 200}, {"label": "neg", "sentence": "b"}
  _bench(tmp_path / "bench", train=[long, long, long, short])
  d = _mini(tmp_path, training={"max_truncated_share": 0.5})
  with pytest.raises(DataError, match=r"mini/train: 3 of 4 prompts \(75%\) are longer than training\.max_length=128 "
                                      r".*raise training\.max_length, or set training\.max_truncated_share: 1\.0"):
    _prepare(d)
  # At the default share it is a note (the existing 1-of-2 case is covered above).
  p = _prepare(_mini(tmp_path))
  assert any("3 prompts truncated" in n for n in p.notes)


def test_a_diverging_run_finishes_with_a_warning_and_exit_4(tmp_path, capsys):
  # A learning rate of 1e6 with clipping keeps every value finite but overwrites the weights: task 1's first step
  # is larger than the weights themselves; task 2's loss rises over the task to above chance.
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), method="seqft", optimizer={"lr": 1e6, "clip_norm": 1.0})
  d["eval"]["initial"] = False
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(d))
  assert cli.main(["train", str(path)]) == cli.EXIT_DIVERGED
  captured = capsys.readouterr()
  assert "training diverged on low, high" in captured.err and len(captured.err.strip().splitlines()) == 1
  assert "warning: task 1 (low) diverged: one step moved the parameters by" in captured.out
  assert "warning: task 2 (high) diverged: the mean loss rose from" in captured.out
  res = json.loads((tmp_path / "run_seqft" / "results.json").read_text())
  assert res["diverged"] == ["low", "high"]
  # (The same stream at lr 3e-3 exits 0: tests/test_cli_runner.py::test_train_inspect_eval.)


def test_sigterm_names_the_phase_and_the_last_checkpoint(tmp_path, monkeypatch, capsys):
  # SIGTERM arrives during the boundary before task 2: the message names that boundary and the checkpoint after
  # task 1, and `clsvd train` exits with 143.
  from clsvd_jax.train import runner as runner_mod

  real = runner_mod.boundary

  def boundary(ctx, state, arrays):
    if state.stage == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(ctx, state, arrays)

  monkeypatch.setattr(runner_mod, "boundary", boundary)
  before = signal.getsignal(signal.SIGTERM)
  d = tiny_config_dict(tmp_path, tasks=("low", "high"), method="seqft", training={"steps_per_task": 2})
  d["eval"]["initial"] = False
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(d))
  assert cli.main(["train", str(path)]) == cli.EXIT_SIGTERM
  err = capsys.readouterr().err
  assert "stopped by SIGTERM during the boundary before task 2/2 (high)" in err
  assert "the last checkpoint is" in err and "step_00000002" in err and "--resume" in err
  assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
