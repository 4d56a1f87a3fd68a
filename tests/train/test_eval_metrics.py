"""Option rate (answers that are one of the task's labels) and the predictions file of every evaluation."""

import json

import numpy as np
import pytest
from _train_helpers import tiny_config_dict

from clsvd_jax import cli
from clsvd_jax import config as C
from clsvd_jax.train import outputs, runner
from clsvd_jax.train.evaluate import TaskEval
from clsvd_jax.train.metrics import option_rate


def test_option_rate_uses_exact_match_normalisation():
  labels = ["World", "Sports", "Science or Technology"]
  preds = ["world", " Sports.", "science  or technology!", "Goood", "entraictiontiontiont", "Sport"]
  assert option_rate(preds, labels) == pytest.approx(3 / 6)
  assert option_rate(preds, None) is None  # a free-form task has no label set
  assert option_rate([], labels) is None


def test_task_eval_records_one_line_per_example():
  ev = TaskEval(task="agnews", correct=1, total=3, predictions=["World", "Goood", "sports"],
                targets=["World", "Sports", "Business"], indices=[7, 2, 9], labels=("World", "Sports", "Business"))
  assert ev.accuracy == pytest.approx(1 / 3) and ev.option_rate == pytest.approx(2 / 3)
  assert ev.records() == [
    {"task": "agnews", "id": 7, "prediction": "World", "label": "World", "correct": True, "in_options": True},
    {"task": "agnews", "id": 2, "prediction": "Goood", "label": "Sports", "correct": False, "in_options": False},
    {"task": "agnews", "id": 9, "prediction": "sports", "label": "Business", "correct": False, "in_options": True},
  ]
  free = TaskEval(task="qa", correct=0, total=1, predictions=["x"], targets=["y"], indices=[0])
  assert free.option_rate is None and free.records()[0]["in_options"] is None


def test_prediction_file_names():
  assert outputs.prediction_file(None) == "predictions/initial.jsonl"
  assert outputs.prediction_file("dbpedia") == "predictions/after_dbpedia.jsonl"
  assert outputs.prediction_file("a+b/c d") == "predictions/after_a+b_c_d.jsonl"


@pytest.fixture(scope="module", params=["seqft", "mtl"])
def finished(request, tmp_path_factory):
  tmp = tmp_path_factory.mktemp(request.param)
  d = tiny_config_dict(tmp, method=request.param, tasks=("low", "high"), training={"steps_per_task": 3})
  cfg = C.from_dict(d)
  p = runner.prepare(cfg)
  return runner.run(cfg, echo=None, prepared=p), p, tmp / f"run_{request.param}"


def test_every_evaluation_saves_its_predictions(finished):
  res, p, run_dir = finished
  rows = ["initial"] + [f"after_{r}" for r in res["row_names"]]
  assert res["predictions"] == [f"predictions/{r}.jsonl" for r in rows]
  assert sorted(f.name for f in (run_dir / "predictions").iterdir()) == sorted(f"{r}.jsonl" for r in rows)
  accuracies = [res["R_initial"], *res["R"]]
  rates = [res["option_rate_initial"], *res["option_rate"]]
  for rel, acc, rate in zip(res["predictions"], accuracies, rates):
    records = outputs.read_predictions(run_dir / rel)
    assert len(records) == sum(len(s) for s in p.eval_splits)
    for j, (name, split) in enumerate(zip(p.names, p.eval_splits)):
      mine = [r for r in records if r["task"] == name]
      # Every example once, with its gold answer; the file agrees with R and the option rate of results.json.
      assert sorted(r["id"] for r in mine) == sorted(e.index for e in split.examples)
      assert {r["id"]: r["label"] for r in mine} == {e.index: e.target for e in split.examples}
      assert np.mean([r["correct"] for r in mine]) == pytest.approx(acc[j])
      assert np.mean([r["in_options"] for r in mine]) == pytest.approx(rate[j])
      assert all(isinstance(r["prediction"], str) for r in mine)


def test_inspect_shows_option_rates(finished, capsys):
  res, _, run_dir = finished
  assert cli.main(["inspect", str(run_dir), "--no-plots"]) == 0
  out = capsys.readouterr().out
  assert "option rate (% of answers that are one of the task's labels)" in out
  saved = json.loads((run_dir / "results.json").read_text())
  assert saved["option_rate"] == res["option_rate"] and "option_rate=" in outputs.format_summary(saved)
