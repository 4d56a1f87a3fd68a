"""Bad input refuses to start with a clear message; a non-finite loss stops the run and keeps the last checkpoint."""

import json

import pytest
from _train_helpers import tiny_config_dict

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
  # default: freeze, since a model built from model.config trains its other parameters under osft's auto default.
  d = tiny_config_dict(tmp_path, osft={"param_policy": {"constrain": ["nothing_matches$"], "default": "freeze"}})
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
  real_lr = step_lib.learning_rate
  monkeypatch.setattr(step_lib, "learning_rate",
                      lambda step, total, cfg: float("nan") if step == 2 else real_lr(step, total, cfg))
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
