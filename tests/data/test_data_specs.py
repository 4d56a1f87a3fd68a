"""Task config validation (each bad key / value names itself and the allowed values) and answer normalisation."""

import pytest

from clsvd_jax import data as D


def test_valid_spec_round_trips():
  cfg = {"name": "dbpedia", "source": "cl_benchmark", "path": "data/cl", "max_train": 100, "labels": ["a", "b"]}
  spec = D.TaskSpec.from_dict(cfg)
  assert spec.labels == ("a", "b") and spec.max_train == 100 and spec.truncation_side == "left"
  assert D.TaskSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("cfg, pattern", [
  ({"name": "x", "source": "cl_benchmark", "path": "p", "max_trian": 3},
   r"tasks\[0\]: unknown key\(s\) \['max_trian'\]; allowed keys: .*max_train"),
  ({"name": "x", "source": "csv", "path": "p"},
   r"tasks\[0\] \(x\)\.source: unknown source 'csv'; allowed: cl_benchmark, trace, tfds, hf, synthetic"),
  ({"name": "x", "source": "cl_benchmark", "path": "p", "max_train": "10"},
   r"tasks\[0\]\.max_train: expected positive integer.*got str '10'"),
  ({"name": "x", "source": "cl_benchmark", "path": "p", "max_eval": True}, r"max_eval: expected positive integer"),
  ({"name": "x", "source": "cl_benchmark", "path": "p", "max_eval": 0}, r"max_eval: expected a positive integer"),
  ({"source": "cl_benchmark", "path": "p"}, r"tasks\[0\]: missing required key 'name'"),
  ({"name": "x", "source": "cl_benchmark"}, r"source 'cl_benchmark' needs the key 'path'"),
  ({"name": "x", "source": "tfds"}, r"source 'tfds' needs the key 'tfds_name'"),
  ({"name": "x", "source": "hf"}, r"source 'hf' needs 'hf_name'.*or 'path'"),
  ({"name": "x", "source": "trace", "path": "p", "labels": ["a", "a"]}, r"labels: duplicate label words"),
  ({"name": "x", "source": "trace", "path": "p", "template": "no sentence"}, r"\{sentence\} exactly once"),
  ({"name": "x", "source": "trace", "path": "p", "truncation_side": "middle"},
   r"truncation_side: 'middle'; allowed: left, right"),
  ("just a string", r"tasks\[0\]: expected a mapping"),
])
def test_bad_specs_name_the_field(cfg, pattern):
  with pytest.raises(D.DataError, match=pattern):
    D.parse_task_specs([cfg])


def test_stream_level_errors():
  with pytest.raises(D.DataError, match=r"tasks: expected a non-empty list"):
    D.parse_task_specs([])
  same = {"name": "x", "source": "trace", "path": "p"}
  with pytest.raises(D.DataError, match=r"tasks\[1\]: task name 'x' already used by tasks\[0\]"):
    D.parse_task_specs([same, same])


def test_synthetic_spec_rejects_unknown_task(tmp_path):
  with pytest.raises(D.DataError, match=r"synthetic task 'nope': unknown; .*\['low', 'high', 'mark', 'sign'\]"):
    D.load_task(D.TaskSpec.from_dict({"name": "nope", "source": "synthetic", "path": str(tmp_path)}))


@pytest.mark.parametrize("raw, norm", [
  ("  Science or   Technology.\n", "science or technology"),
  ("Very-Negative!", "verynegative"),
  ("«Oui», dit-il…", "oui ditil"),
  ("a\tb\n\nc", "a b c"),
  ("", ""),
])
def test_normalize_answer(raw, norm):
  assert D.normalize_answer(raw) == norm


def test_exact_match_accuracy():
  assert D.exact_match("Positive.", " positive") and not D.exact_match("positive", "negative")
  assert D.exact_match_accuracy(["Red", "blue!", "x"], ["red", "Blue", "y"]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="2 predictions for 1 targets"):
    D.exact_match_accuracy(["a", "b"], ["a"])
