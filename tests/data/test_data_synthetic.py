"""The generated task stream: deterministic, CL_Benchmark layout, balanced, one input domain per task, the key
symbol decides the answer."""

import collections
import json

import pytest
import transformers

from clsvd_jax import data as D
from clsvd_jax.data import synthetic


def _tree(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_the_seed(tmp_path):
  D.write_synthetic_benchmark(tmp_path / "a", seed=5, n_train=40, n_test=12)
  D.write_synthetic_benchmark(tmp_path / "b", seed=5, n_train=40, n_test=12)
  D.write_synthetic_benchmark(tmp_path / "c", seed=6, n_train=40, n_test=12)
  a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
  assert a == b and a != c
  assert a["SYN/low/labels.json"] == c["SYN/low/labels.json"]


def test_layout_is_cl_benchmark_and_the_loader_reads_it(tmp_path):
  configs = D.write_synthetic_benchmark(tmp_path, seed=0, n_train=40, n_test=12)
  names = [t.name for t in D.SYNTHETIC_TASKS]
  assert [c["name"] for c in configs] == names == ["low", "high", "mark", "sign"]
  for n in names:
    assert sorted(p.name for p in (tmp_path / "SYN" / n).iterdir()) == ["dev.json", "labels.json", "test.json",
                                                                        "train.json"]
  config = json.loads((tmp_path / "instruction_config.json").read_text())
  assert config == {"SYN": [{"instruction_type": "zero-shot", "instruction": synthetic.INSTRUCTION}]}
  stream = D.load_tasks(D.parse_task_specs(configs))
  assert [len(d.train) for d in stream] == [40] * 4 and [len(d.eval) for d in stream] == [12] * 4
  low = stream[0]
  assert low.task.labels == ("red", "blue", "green", "pink") and low.task.splits["eval"] == "dev"
  assert D.build_prompt(low.task, low.train[0]) == (
    f"Task:SYN\nDataset:low\nName the word for the string.\nOption: red, blue, green, pink \n"
    f"{low.train[0].sentence}\nAnswer:")
  # The 'synthetic' source writes the same stream itself and reads it the same way.
  same = D.load_task(D.TaskSpec.from_dict({"name": "low", "source": "synthetic", "path": str(tmp_path / "s")}))
  assert same.task.labels == low.task.labels and same.task.source == "synthetic"


def test_balanced_short_and_the_key_decides(tmp_path):
  D.write_synthetic_benchmark(tmp_path, seed=1, n_train=200, n_test=20)
  tasks = D.SYNTHETIC_TASKS
  tok = transformers.ByT5Tokenizer()
  for i, t in enumerate(tasks):
    table = synthetic.key_table(t, i, 1)
    recs = json.loads((tmp_path / "SYN" / t.name / "train.json").read_text())
    assert collections.Counter(r["label"] for r in recs) == {w: 50 for w in t.labels}
    assert all(3 <= len(w) <= 6 for w in t.labels) and len({w[0] for w in t.labels}) == len(t.labels)
    for r in recs:
      s = r["sentence"]
      assert len(s) == synthetic.STRING_LENGTH
      (key,) = [c for c in s if c in t.keys]
      assert t.labels[table[key]] == r["label"]
      assert set(s) - {key} <= set(t.filler)
  data = D.load_task(D.TaskSpec.from_dict({"name": "high", "source": "cl_benchmark", "path": str(tmp_path)}))
  enc = D.encode_examples(data.task, data.train, tok, kind="decoder", max_length=128, max_target_length=8)
  assert enc.truncated_prompts == 0 and max(e.length for e in enc.examples) <= 128


def test_each_task_has_its_own_input_domain_and_words():
  # Disjoint alphabets (the finished tasks' input subspaces leave room for the next) and disjoint label words
  # (a model that answers the newest task's way is wrong on every earlier task: forgetting is visible).
  tasks = D.SYNTHETIC_TASKS
  alphabets = [set("".join(r["sentence"] for r in synthetic.generate_task(tasks, i, 0, 100, 0)))
               for i in range(len(tasks))]
  for i in range(len(tasks)):
    for j in range(i):
      assert not alphabets[i] & alphabets[j]
      assert not set(tasks[i].labels) & set(tasks[j].labels)


def test_ensure_rewrites_only_on_change(tmp_path):
  D.ensure_synthetic_benchmark(tmp_path, seed=0, n_train=8, n_test=4)
  stamp = (tmp_path / "SYN" / "low" / "train.json").stat().st_ino
  D.ensure_synthetic_benchmark(tmp_path, seed=0, n_train=8, n_test=4)
  assert (tmp_path / "SYN" / "low" / "train.json").stat().st_ino == stamp
  D.ensure_synthetic_benchmark(tmp_path, seed=2, n_train=8, n_test=4)
  assert (tmp_path / "SYN" / "low" / "train.json").stat().st_ino != stamp  # rewritten (atomic replace)
  assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 2


def test_bad_task_definitions():
  with pytest.raises(ValueError, match="overlap"):
    clash = (D.SyntheticTask("a", "0123", ("w", "x", "y", "z"), "ab"),
             D.SyntheticTask("b", "3456", ("p", "q", "r", "s"), "cd"))
    D.write_synthetic_benchmark("/nonexistent-never-written", tasks=clash)
  with pytest.raises(ValueError, match="overlap"):
    clash = (D.SyntheticTask("a", "0123", ("w", "x", "y", "z"), "ab"),
             D.SyntheticTask("b", "4567", ("p", "q", "r", "s"), "bc"))
    D.write_synthetic_benchmark("/nonexistent-never-written", tasks=clash)
  with pytest.raises(ValueError, match="filler letter"):
    synthetic.generate_task((D.SyntheticTask("a", "01", ("w", "x"), ""),), 0, 0, 4, 0)
  with pytest.raises(ValueError, match="one distinct key symbol per label"):
    synthetic.generate_task((D.SyntheticTask("a", "01", ("w", "x", "y"), "ab"),), 0, 0, 4, 0)
