"""pertask: the rows it assembles from one evaluation per stage equal the rows of evaluating every task with the model
that owns it (the definition), and the metrics are those of independent models."""

import numpy as np
import pytest

from clsvd_jax.methods.pertask import PerTaskPlan, Source
from clsvd_jax.train import metrics


def test_sources_of_each_row():
  plan = PerTaskPlan(4)
  assert plan.sources(0) == (Source.OWN, Source.INITIAL, Source.INITIAL, Source.INITIAL)
  assert plan.sources(2) == (Source.KEPT, Source.KEPT, Source.OWN, Source.INITIAL)
  assert plan.tasks_to_evaluate(1, initial_known=True) == {Source.OWN: [1]}
  assert plan.tasks_to_evaluate(1, initial_known=False) == {Source.OWN: [1], Source.INITIAL: [2, 3]}
  assert all(plan.restarts_before(s) for s in range(4))
  with pytest.raises(ValueError, match="outside"):
    plan.sources(4)
  with pytest.raises(ValueError, match="at least one task"):
    PerTaskPlan(0)


def test_assembled_rows_equal_evaluating_every_task_with_its_model():
  t = 5
  rng = np.random.RandomState(0)
  # score[m][j]: accuracy of model m on task j; m = t is the initial model. Model m is trained on task m only.
  score = rng.rand(t + 1, t)
  initial = score[t] / 2
  score[np.arange(t), np.arange(t)] = initial + 0.5  # a model beats the initial one on its own task
  plan = PerTaskPlan(t)
  rows, diagonal = [], []
  for i in range(t):
    row = plan.assemble_row(i, score[i, i], diagonal, initial)
    # The definition: after stage i, task j is answered by model j if it exists (j <= i), else the initial model.
    assert row == [score[j, j] if j <= i else initial[j] for j in range(t)]
    diagonal.append(row[i])
    rows.append(row)
  summary = metrics.summarize(rows, baseline=initial)
  assert summary["BWT"] == 0.0 and summary["forgetting"] == 0.0 and summary["FWT"] == 0.0
  assert summary["AA"] == pytest.approx(np.mean(np.diag(score[:t])))
  with pytest.raises(ValueError, match="diagonal"):
    plan.assemble_row(2, 0.5, [0.1], initial)
  with pytest.raises(ValueError, match="initial"):
    plan.assemble_row(0, 0.5, [], initial[:3])
