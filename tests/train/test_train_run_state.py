"""The run state round-trips through JSON (the checkpoint's meta.json) and counts its loss windows by hand."""

import json

import pytest

from clsvd_jax.train.run_state import RunState, TaskStats, loss_window


def test_run_state_round_trips_through_json():
  s = RunState(config_hash="abc", stage=1, phase="train", step=7, global_step=27, position={"epoch": 0, "step": 7},
               R=[[0.5, 0.25]], counts=[[2, 1]], totals=[4, 4], baseline=[0.0, 0.0], baseline_counts=[0, 0],
               invariant=[{"w": {"left": 1e-7}}], losses=[1.2345678901234567], diverged=["low"], tokens=123.0,
               seen_tokens=456.0, train_seconds=1.5, eval_seconds=0.25,
               task_stats=TaskStats(head_sum=3.1, head_count=2, tail_sum=0.1 + 0.2, tail_count=1, param_norm=9.5,
                                    max_update_norm=0.01))
  back = RunState.from_dict(json.loads(json.dumps(s.to_dict())))
  assert back == s and isinstance(back.task_stats, TaskStats)
  s.next_stage()
  assert (s.stage, s.phase, s.step, s.position, s.task_stats) == (2, "boundary", 0, None, TaskStats())


def test_run_state_reads_older_metas_and_refuses_unknown_keys():
  # A meta.json written before task_stats / seen_tokens / diverged existed still resumes, with their defaults.
  old = {"config_hash": "abc", "stage": 1, "phase": "boundary", "step": 0, "global_step": 4, "position": None,
         "R": [[1.0]], "counts": [[1]], "baseline": None, "baseline_counts": None, "invariant": [{}], "losses": [2.0],
         "tokens": 10.0, "train_seconds": 1.0, "eval_seconds": 1.0, "totals": [1]}
  s = RunState.from_dict(old)
  assert s.task_stats == TaskStats() and s.seen_tokens == 0.0 and s.diverged == []
  with pytest.raises(ValueError, match="unknown keys"):
    RunState.from_dict({**old, "stagee": 1})
  with pytest.raises(ValueError, match="phase"):
    RunState.from_dict({**old, "phase": "done"})


def test_task_stats_windows_by_hand():
  # 25 steps: windows of 2 (a tenth, rounded down); head = steps 0-1, tail = steps 23-24.
  assert loss_window(25) == 2 and loss_window(5) == 1
  t = TaskStats()
  for step in range(25):
    t.add(step, 25, float(step), update_norm=float(step % 7))
  assert (t.head_count, t.tail_count) == (2, 2)
  assert t.head == pytest.approx(0.5) and t.tail == pytest.approx(23.5) and t.max_update_norm == 6.0
  one = TaskStats()
  one.add(0, 1, 3.0, 0.0)  # a one-step task: the step is head and tail
  assert one.head == one.tail == 3.0
