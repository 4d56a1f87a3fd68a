"""End to end on a tiny T5: a 3-task osft stream, its outputs, the invariant, and kill-and-resume."""

import json
from pathlib import Path

import numpy as np
import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import config as C
from clsvd_jax.data import BatchIterator
from clsvd_jax.train import checkpoint as ckpt_lib
from clsvd_jax.train import outputs, runner


def _run(d, **kw):
  return runner.run(C.from_dict(d), echo=None, **kw)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
  """One uninterrupted osft run (checkpoints every 3 steps), shared by the tests of this file."""
  tmp = tmp_path_factory.mktemp("stream")
  d = tiny_config_dict(tmp, training={"checkpoint_every": 3, "keep_checkpoints": 20})
  return tmp, d, _run(d)


def test_results_json_has_the_keys_and_shapes(stream):
  _, d, res = stream
  run_dir = d["run_dir"]
  saved = json.loads((Path(run_dir) / "results.json").read_text())
  for key in ("tasks", "R", "AA", "BWT", "FWT", "forgetting", "pooled_accuracy", "ranks", "invariant_max", "config",
              "R_initial", "per_task_mean_accuracy", "invariant", "scheduler"):
    assert key in saved, key
  assert saved["tasks"] == ["low", "high", "mark"]
  r = np.asarray(saved["R"])
  assert r.shape == (3, 3) and ((0 <= r) & (r <= 1)).all()
  assert len(saved["R_initial"]) == 3
  assert len(saved["ranks"]) == 3 and len(saved["invariant"]) == 3
  ranks = saved["ranks"]
  paths = sorted(ranks[0])
  assert "encoder/layers/self_attn/q/weight" in paths and "decoder/layers/cross_attn/o/weight" in paths
  # Importance ranks with mrr 0.2 .. trr 0.6 of min(m, n), never shrinking from task to task.
  for path in paths:
    k = np.asarray([t[path] for t in ranks])
    assert (np.diff(k, axis=0) >= 0).all()
    assert (k[0] >= 1).all()
  assert saved["config"]["method"] == "osft"
  assert saved["AA"] == pytest.approx(np.mean(r[-1]))
  assert saved["BWT"] == pytest.approx(np.mean([r[2, j] - r[j, j] for j in range(2)]))
  # The invariant: every constrained matrix kept U^T dW = 0 and dW V = 0 over every task, to float rounding.
  assert 0.0 < saved["invariant_max"] <= 1e-5
  assert set(saved["invariant"][1]) == set(paths)
  names, rows = outputs.read_r_csv(f"{run_dir}/R.csv")
  assert names == saved["tasks"] and np.allclose(rows, r, atol=1e-6)
  for png in outputs.PLOTS:
    assert (Path(run_dir) / png).stat().st_size > 1000, png
  tb = list((Path(run_dir) / "tensorboard").glob("events.out.tfevents*"))
  assert tb and tb[0].stat().st_size > 0
  records = saved["scheduler"]["records"]
  assert [rec["task"] for rec in records] == [0, 1, 2] and all(rec["protected"] for rec in records)
  energy = records[0]["energy"]["encoder/layers/mlp/wi/weight"]
  assert all(0.0 < e < 1.0 for e in energy)
  assert set(records[0]["importance"]) == {"encoder/layers", "decoder/layers"}


def test_tokens_seen_count_inputs_and_targets(stream):
  # The encoder reads the prompt (+ EOS), the decoder the target (+ EOS): tok_s and tokens_per_second count both.
  tmp, d, res = stream
  p = runner.prepare(C.from_dict(d))
  want = target = 0
  for si, split in enumerate(p.train_splits):
    it = BatchIterator(split, p.info, batch_size=4, seed=si)
    for step in range(4):
      rows = [split.examples[i] for i in it.permutation(0)[step * 4:(step + 1) * 4]]
      want += sum(len(e.prompt_ids) + len(e.target_ids) for e in rows)
      target += sum(len(e.target_ids) for e in rows)
  assert res["train_seen_tokens"] == want and res["train_tokens"] == target
  assert res["tokens_per_second"] == pytest.approx(want / res["train_seconds"])


def test_kill_and_resume_equals_uninterrupted(stream):
  tmp, d, full = stream
  d2 = json.loads(json.dumps(d))
  d2["run_dir"] = str(tmp / "killed")
  with pytest.raises(runner.RunInterrupted):
    _run(d2, stop_after_steps=7)  # task 2, step 3: the newest checkpoint is the one after global step 6
  latest = ckpt_lib.latest_checkpoint(d2["run_dir"])
  assert latest is not None and latest.name == "step_00000006"
  assert ckpt_lib.read_meta(latest)["run"]["stage"] == 1
  assert not (tmp / "killed" / "results.json").exists()
  resumed = _run(d2, resume=True)
  np.testing.assert_allclose(resumed["R"], full["R"], atol=1e-6)
  np.testing.assert_allclose(resumed["R_initial"], full["R_initial"], atol=1e-6)
  assert resumed["ranks"] == full["ranks"]
  assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
  assert resumed["invariant_max"] <= 1e-5
  assert resumed["global_steps"] == full["global_steps"] == 12


def test_resume_refuses_another_config(stream):
  tmp, d, _ = stream
  d2 = json.loads(json.dumps(d))
  d2["optimizer"]["lr"] = 1e-2
  with pytest.raises(C.ConfigError, match="written with another config"):
    _run(d2, resume=True)


def test_mtl_trains_all_tasks_in_one_stage(tmp_path):
  d = tiny_config_dict(tmp_path, method="mtl", tasks=("low", "high"),
                       training={"bf16_compute": True, "steps_per_task": 3}, optimizer={"grad_accum": 2})
  res = _run(d)
  assert res["row_names"] == ["low+high"] and np.asarray(res["R"]).shape == (1, 2)
  assert res["BWT"] is None and res["forgetting"] is None and res["FWT"] is None
  assert res["global_steps"] == 3 and res["ranks"] == [] and res["invariant_max"] == 0.0
  assert all(np.isfinite(res["train_loss"]))
  assert (Path(d["run_dir"]) / "R_heatmap.png").is_file()
