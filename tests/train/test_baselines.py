"""The baselines end to end on the tiny 3-task stream: each method's defining property as the runner shows it,
the results.json every method shares, and kill-and-resume equal to an uninterrupted run (replay, ewc)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from _train_helpers import tiny_config_dict

import clsvd_jax as cj
from clsvd_jax import config as C
from clsvd_jax import models
from clsvd_jax.methods import lora as lora_lib
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import outputs, runner
from clsvd_jax.train import rank_classification as rank_lib
from clsvd_jax.train.phases.start import restore_arrays, restore_params

# Keys every method writes (the comparison reads them).
SHARED_KEYS = ("tasks", "R", "R_initial", "AA", "BWT", "FWT", "forgetting", "pooled_accuracy", "option_rate",
               "R_rank", "R_rank_initial", "rank_metrics", "train_loss", "global_steps", "param_policy",
               "peak_memory", "boundary_seconds", "train_seconds", "eval_seconds", "config")

SECTIONS = {
  "replay": {"replay": {"memory_per_task": 8, "ratio": 0.5, "strategy": "per_label"},
             "training": {"steps_per_task": None, "epochs": 1}},
  "ewc": {"ewc": {"lam": 10.0, "fisher_batches": 2}},
  "lora": {"lora": {"rank": 2, "alpha": 4.0}, "optimizer": {"lr": 1e-2}},
  "olora": {"lora": {"rank": 2, "alpha": 4.0, "lambda2": 0.01}, "optimizer": {"lr": 1e-2}},
  "gpm": {"gpm": {"eps": 0.9}},
  "pertask": {},
}


def _run(d, **kw):
  return runner.run(C.from_dict(d), echo=None, **kw)


def _config(tmp, method, run_dir=None):
  sections = json.loads(json.dumps(SECTIONS[method]))
  training = {"checkpoint_every": 3, "keep_checkpoints": 50} | sections.pop("training", {})
  d = tiny_config_dict(tmp, method=method, training=training, **sections)
  if run_dir is not None:
    d["run_dir"] = str(tmp / run_dir)
  return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """``finished(method) -> (tmp, config dict, results)``: one uninterrupted run per method, made on first use."""
  tmp = tmp_path_factory.mktemp("baselines")
  cache = {}

  def get(method):
    if method not in cache:
      d = _config(tmp, method)
      cache[method] = (tmp, d, _run(d))
    return cache[method]

  return get


def _checkpoint_after_stage(run_dir, stage):
  """The checkpoint written at the end of stage ``stage`` (0-based): its run state is at the next boundary."""
  return _checkpoint_in(run_dir, stage + 1, "boundary")


def _checkpoint_in(run_dir, stage, phase):
  """The first checkpoint whose run state is at ``stage`` (0-based) and ``phase``."""
  for path in ckpt_lib.list_checkpoints(run_dir):
    run = ckpt_lib.read_meta(path)["run"]
    if (run["stage"], run["phase"]) == (stage, phase):
      return path
  raise AssertionError(f"no checkpoint at stage {stage}, phase {phase} in {run_dir}")


def _arrays(d, ckpt):
  cfg = C.from_dict(d)
  return restore_arrays(cfg, runner.prepare(cfg), ckpt).value


def _check_shared(res):
  for key in SHARED_KEYS:
    assert key in res, key
  r = np.asarray(res["R"])
  assert r.shape == (3, 3) and ((0 <= r) & (r <= 1)).all()
  assert res["AA"] == pytest.approx(r[-1].mean())
  ranks = np.asarray(res["R_rank"], np.float64)
  # Every synthetic task has 4 labels and 8 evaluation examples: accuracies are multiples of 1/8.
  assert ranks.shape == (3, 3) and np.allclose(ranks * 8, np.round(ranks * 8))
  assert res["rank_metrics"]["AA"] == pytest.approx(ranks[-1].mean())
  assert all(np.isfinite(res["train_loss"]))
  assert res["peak_memory"]["host_rss_bytes"] > 0


def test_replay_memory_and_mixed_batches(finished):
  _, d, res = finished("replay")
  _check_shared(res)
  # per_label memory of 8 from each finished task (the last task is never remembered).
  assert res["replay_memory"] == {"size": 16, "per_task": {"low": 8, "high": 8}}
  # One epoch per task over 32 examples, batch 4: task 1 has no memory (8 steps); tasks 2 and 3 take 2 memory rows
  # per batch (ratio 0.5), so 2 current rows per batch: 16 steps each.
  assert res["global_steps"] == 8 + 16 + 16
  meta = ckpt_lib.read_meta(_checkpoint_after_stage(d["run_dir"], 2))
  memory = meta["run"]["method_state"]["memory"]
  assert memory["tasks"] == [0] * 8 + [1] * 8 and all(0 <= i < 32 for i in memory["indices"])


def test_replay_kill_and_resume_equals_uninterrupted(finished):
  tmp, _, full = finished("replay")
  d = _config(tmp, "replay", run_dir="replay_killed")
  with pytest.raises(runner.RunInterrupted):
    _run(d, stop_after_steps=12)  # task 2, step 4 of 16: the memory is in the checkpoint
  assert ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(d["run_dir"]))["run"]["method_state"]["memory"]
  resumed = _run(d, resume=True)
  assert resumed["train_loss"] == full["train_loss"]
  assert resumed["R"] == full["R"] and resumed["R_rank"] == full["R_rank"]
  assert resumed["replay_memory"] == full["replay_memory"] and resumed["global_steps"] == full["global_steps"]


def test_ewc_consolidates_the_finished_tasks(finished):
  _, d, res = finished("ewc")
  _check_shared(res)
  run_dir = d["run_dir"]
  end1 = _arrays(d, _checkpoint_in(run_dir, 1, "boundary"))  # task 1 done, nothing consolidated yet
  once = _arrays(d, _checkpoint_in(run_dir, 1, "train")).method  # inside task 2
  twice = _arrays(d, _checkpoint_in(run_dir, 2, "train")).method  # inside task 3
  assert all(not np.asarray(f).any() for f in jax.tree.leaves(end1.method.fisher))
  # One finished task: the penalty is anchored at the weights task 1 ended with (its Fisher-weighted mean), with
  # no offset, and its Fisher is >= 0 and positive somewhere in the matrices.
  anchors = cj.flatten_with_paths(once.anchor)
  for path, w in cj.flatten_with_paths(end1.params).items():
    np.testing.assert_allclose(np.asarray(anchors[path]), np.asarray(w), rtol=1e-6, atol=1e-7, err_msg=path)
  fisher = cj.flatten_with_paths(once.fisher)
  assert all(float(np.min(f)) >= 0.0 for f in fisher.values())
  assert float(np.max(fisher["encoder/layers/self_attn/q/weight"])) > 0.0
  assert float(once.offset) == pytest.approx(0.0, abs=1e-6)
  # The second boundary adds task 2's Fisher (decay 1: the sum only grows) and two distinct anchors leave a
  # positive offset (the part of the per-task penalties that one quadratic around their mean cannot hold).
  for a, b in zip(jax.tree.leaves(once.fisher), jax.tree.leaves(twice.fisher)):
    assert np.all(np.asarray(b) >= np.asarray(a))
  assert float(twice.offset) > 0.0


def test_ewc_kill_and_resume_equals_uninterrupted(finished):
  tmp, _, full = finished("ewc")
  d = _config(tmp, "ewc", run_dir="ewc_killed")
  with pytest.raises(runner.RunInterrupted):
    _run(d, stop_after_steps=7)  # task 2, step 3: the checkpoint at global step 6 holds the consolidated state
  resumed = _run(d, resume=True)
  assert resumed["train_loss"] == full["train_loss"]
  assert resumed["R"] == full["R"] and resumed["R_rank"] == full["R_rank"]
  a = _arrays(d, ckpt_lib.latest_checkpoint(d["run_dir"]))
  b = _arrays(full_d := _config(tmp, "ewc"), ckpt_lib.latest_checkpoint(full_d["run_dir"]))
  for x, y in zip(jax.tree.leaves((a.params, a.method)), jax.tree.leaves((b.params, b.method))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_trains_adapters_and_evaluates_the_merged_model(finished):
  _, d, res = finished("lora")
  _check_shared(res)
  cfg = C.from_dict(d)
  prepared = runner.prepare(cfg)
  _, initial = models.functional(prepared.model)
  initial = cj.flatten_with_paths(jax.tree.map(np.asarray, initial))
  adapters = restore_arrays(cfg, prepared, d["run_dir"]).value.params
  targets = sorted(adapters)
  assert "encoder/layers/self_attn/q/weight" in targets and "decoder/layers/cross_attn/v/weight" in targets
  assert all(f.a.shape[0] == 1 and np.abs(np.asarray(f.b)).max() > 0 for f in adapters.values())
  merged = restore_params(cfg, prepared, d["run_dir"]).value
  flat = cj.flatten_with_paths(merged)
  for path, w in flat.items():
    if path in adapters:
      expected = initial[path] + np.asarray(lora_lib.delta(adapters[path], 4.0 / 2))
      np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=1e-6, err_msg=path)
    else:  # the base never moves
      np.testing.assert_array_equal(np.asarray(w), initial[path], err_msg=path)
  # The runner ranked the options with the merged model: the same scores from the checkpoint.
  scorer = rank_lib.make_option_scorer(models.functional(prepared.model)[0], kind=prepared.kind,
                                       decoder_start_id=prepared.info.decoder_start_id)
  last = [rank_lib.rank_classify_split(scorer, merged, split, options, prepared.info, batch_size=8).accuracy
          for split, options in zip(prepared.eval_splits, prepared.options)]
  assert last == pytest.approx(res["R_rank"][-1])
  assert res["param_policy"]["adapted"] == targets and res["param_policy_counts"]["train"] == 0


def test_olora_new_slot_per_task_old_slots_frozen(finished):
  _, d, res = finished("olora")
  _check_shared(res)
  slots = [_arrays(d, _checkpoint_after_stage(d["run_dir"], s)).params for s in range(3)]
  for path in slots[0]:
    b = [np.asarray(s[path].b) for s in slots]
    a = [np.asarray(s[path].a) for s in slots]
    assert b[0].shape[0] == 3  # one slot per task
    # After task t, slots t' > t are untouched (B = 0) and slots t' < t are exactly what they were.
    for t in range(3):
      assert np.abs(b[t][t]).max() > 0, (path, t)
      for later in range(t + 1, 3):
        assert not b[t][later].any(), (path, t, later)
      for earlier in range(t):
        np.testing.assert_array_equal(b[t][earlier], b[earlier][earlier])
        np.testing.assert_array_equal(a[t][earlier], a[earlier][earlier])


def test_gpm_protects_the_input_span_from_task_2(finished):
  _, _, res = finished("gpm")
  _check_shared(res)
  osft = res["config"]["osft"]
  assert (osft["sides"], osft["basis_source"], osft["start_protecting_from"]) == ("right", "activations", 2)
  assert osft["rank_policy"]["name"] == "energy" and osft["rank_policy"]["eps"] == 0.9
  records = res["scheduler"]["records"]
  assert [rec["protected"] for rec in records] == [False, True, True]
  # G (I - V V^T): dW V = 0 over tasks 2 and 3 to float rounding, on every constrained matrix.
  assert res["invariant"][1] and 0.0 < res["invariant_max"] <= 1e-5
  assert max(r["right"] for task in res["invariant"][1:] for r in task.values()) <= 1e-5


def test_pertask_rows_from_one_evaluation_each(finished):
  _, d, res = finished("pertask")
  _check_shared(res)
  for key, initial in (("R", "R_initial"), ("R_rank", "R_rank_initial"), ("option_rate", "option_rate_initial")):
    r, b = res[key], res[initial]
    for i in range(3):
      for j in range(3):
        assert r[i][j] == (r[j][j] if j < i else b[j] if j > i else r[i][j]), (key, i, j)
  assert res["BWT"] == 0.0 and res["FWT"] == 0.0 and res["forgetting"] == 0.0
  # Only the task just trained is evaluated after each stage.
  tasks = {rec["task"] for rec in outputs.read_predictions(Path(d["run_dir"]) / outputs.prediction_file("high"))}
  assert tasks == {"high"}
  # Task 2 restarts from the initial weights with a fresh optimizer: it trains exactly as a one-task stream of
  # 'high' whose batches are drawn with the same seed (stage 1 of seed 0 draws with seed 0 + 1).
  alone = tiny_config_dict(Path(d["run_dir"]).parent, method="seqft", tasks=("high",),
                           training={"seed": 1}, run_dir=str(Path(d["run_dir"]).parent / "high_alone"))
  assert _run(alone)["train_loss"][0] == pytest.approx(res["train_loss"][1], rel=1e-6)
