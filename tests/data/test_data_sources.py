"""Readers: the shared CL_Benchmark sample, the exact O-LoRA prompt, every bad-input message, TRACE, TFDS, HF."""

import json
from pathlib import Path

import numpy as np
import pytest

from clsvd_jax import data as D

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"
CL_ROOT = SHARED / "cl_benchmark"
needs_shared = pytest.mark.skipif(not CL_ROOT.is_dir(), reason=f"sample benchmark {CL_ROOT} absent (it sits next "
                                  "to the repository in the project's workspace)")

SC_INSTRUCTION = "What is the sentiment of the following paragraph? Choose one from the option.\n"


def write_benchmark(root: Path, *, train=None, test=None, labels=("negative", "positive"), dev=None) -> Path:
  """A tiny CL_Benchmark: <root>/SC/toy/{train,test,labels}.json + instruction_config.json."""
  folder = root / "SC" / "toy"
  folder.mkdir(parents=True)
  (root / "instruction_config.json").write_text(json.dumps(
    {"SC": [{"instruction_type": "zero-shot", "instruction": SC_INSTRUCTION}]}))
  train = train if train is not None else [{"label": "positive", "sentence": "Text: good {stuff}\n"},
                                           {"label": "negative", "sentence": "Text: bad\n"}]
  test = test if test is not None else [{"label": "negative", "sentence": "Text: awful\n"}]
  for name, value in (("train", train), ("test", test), ("labels", list(labels)), ("dev", dev)):
    if value is not None:
      (folder / f"{name}.json").write_text(value if isinstance(value, str) else json.dumps(value, indent=1))
  return root


def spec(root, **kw):
  return D.TaskSpec.from_dict({"name": "toy", "source": "cl_benchmark", "path": str(root), **kw})


@needs_shared
def test_shared_sample_loads_with_dev_fallback_and_exact_prompt():
  specs = D.parse_task_specs([{"name": n, "source": "cl_benchmark", "path": str(CL_ROOT)}
                              for n in ("dbpedia", "amazon", "yelp", "agnews")])
  stream = D.load_tasks(specs)
  sizes = {d.task.name: (len(d.train), len(d.eval)) for d in stream}
  assert sizes == {"agnews": (400, 200), "amazon": (500, 250), "dbpedia": (840, 420), "yelp": (500, 250)}
  amazon = stream[1]
  assert amazon.task.group == "SC" and amazon.task.splits == {"train": "train", "eval": "test"}
  assert any("dev.json absent" in n for n in amazon.notes)
  first = json.loads((CL_ROOT / "SC" / "amazon" / "train.json").read_text())[0]
  expected = ("Task:SC\nDataset:amazon\n" + SC_INSTRUCTION
              + "Option: very negative, negative, neutral, positive, very positive \n" + first["sentence"]
              + "\nAnswer:")
  assert D.build_prompt(amazon.task, amazon.train[0]) == expected
  assert amazon.train[0].answer == first["label"]


def test_default_prompt_is_olora_exactly(tmp_path):
  data = D.load_task(spec(write_benchmark(tmp_path)))
  # Braces in a sentence must not be taken for template fields.
  assert D.build_prompt(data.task, data.train[0]) == (
    "Task:SC\nDataset:toy\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
    "Option: negative, positive \nText: good {stuff}\n\nAnswer:")


def test_custom_template_and_instruction(tmp_path):
  data = D.load_task(spec(write_benchmark(tmp_path), instruction="Rate it.", template="[{name}] {instruction} "
                          "({options}) {sentence}=>"))
  assert D.build_prompt(data.task, "x") == "[toy] Rate it. (negative, positive) x=>"
  with pytest.raises(D.DataError, match=r"unknown field\(s\) \['label'\].*allowed: \{group\}"):
    D.load_task(spec(tmp_path, template="{label} {sentence}"))


def test_task_folder_path_and_group_inference(tmp_path):
  root = write_benchmark(tmp_path)
  by_folder = D.load_task(spec(root / "SC" / "toy"))
  assert by_folder.task.group == "SC" and by_folder.task.instruction == SC_INSTRUCTION
  assert D.load_task(spec(root, group="SC")).task.labels == ("negative", "positive")


def test_dev_json_is_used_when_present(tmp_path):
  root = write_benchmark(tmp_path, dev=[{"label": "positive", "sentence": "dev one"}])
  data = D.load_task(spec(root))
  assert data.task.splits["eval"] == "dev" and data.eval[0].sentence == "dev one" and not data.notes


def test_missing_file_names_path_and_layout(tmp_path):
  root = write_benchmark(tmp_path, test=None)
  (root / "SC" / "toy" / "test.json").unlink(missing_ok=True)
  with pytest.raises(D.DataError) as e:
    D.load_task(spec(root))
  assert "SC/toy/test.json: file not found" in str(e.value) and "<root>/<group>/<task>" in str(e.value)
  with pytest.raises(D.DataError, match=r"no folder .*/<group>/nope.*groups present: \['SC'\]"):
    D.load_task(D.TaskSpec.from_dict({"name": "nope", "source": "cl_benchmark", "path": str(root)}))


def test_malformed_json_names_the_line(tmp_path):
  bad = '[\n{"label": "positive", "sentence": "a"},\n{"label": "negative" "sentence": "b"}\n]\n'
  root = write_benchmark(tmp_path, train=bad)
  with pytest.raises(D.DataError, match=r"train\.json:3:\d+: malformed JSON .*line 3"):
    D.load_task(spec(root))


def test_label_not_in_labels_json(tmp_path):
  root = write_benchmark(tmp_path, train=[{"label": "positive", "sentence": "a"}, {"label": "meh", "sentence": "b"}])
  with pytest.raises(D.DataError) as e:
    D.load_task(spec(root))
  msg = str(e.value)
  assert "train.json: record 1 has label 'meh'" in msg and "labels.json" in msg
  assert "['negative', 'positive']" in msg and "add the label" in msg


def test_empty_split_and_missing_field(tmp_path):
  with pytest.raises(D.DataError, match=r"test\.json: the 'test' split of task 'toy' is empty"):
    D.load_task(spec(write_benchmark(tmp_path / "a", test=[])))
  with pytest.raises(D.DataError, match=r"train\.json: record 0 lacks the field 'sentence'.*keys found: \['label', "
                     r"'text'\]"):
    D.load_task(spec(write_benchmark(tmp_path / "b", train=[{"label": "positive", "text": "a"}])))
  with pytest.raises(D.DataError, match=r"record 0 field 'sentence' is a int"):
    D.load_task(spec(write_benchmark(tmp_path / "c", train=[{"label": "positive", "sentence": 3}])))


def test_missing_instruction_group(tmp_path):
  root = write_benchmark(tmp_path)
  (root / "instruction_config.json").write_text(json.dumps({"TC": [{"instruction": "x"}]}))
  with pytest.raises(D.DataError, match=r"no instruction for group 'SC' \(groups present: \['TC'\]\).*'instruction'"):
    D.load_task(spec(root))
  assert D.load_task(spec(root, instruction="Rate.\n")).task.instruction == "Rate.\n"


def test_load_tasks_reports_every_bad_task(tmp_path):
  root = write_benchmark(tmp_path)
  specs = [D.TaskSpec.from_dict({"name": n, "source": "cl_benchmark", "path": str(root)}) for n in ("x", "toy", "y")]
  with pytest.raises(D.DataError) as e:
    D.load_tasks(specs)
  assert str(e.value).startswith("2 tasks cannot be read") and "'x'" in str(e.value) and "'y'" in str(e.value)


def test_subsample_is_seeded_and_in_file_order(tmp_path):
  recs = [{"label": ["negative", "positive"][i % 2], "sentence": f"s{i}"} for i in range(50)]
  root = write_benchmark(tmp_path, train=recs)
  a = D.load_task(spec(root, max_train=10, sample_seed=3)).train
  b = D.load_task(spec(root, max_train=10, sample_seed=3)).train
  c = D.load_task(spec(root, max_train=10, sample_seed=4)).train
  idx = [e.index for e in a]
  assert idx == [e.index for e in b] and idx != [e.index for e in c] and idx == sorted(idx) and len(idx) == 10


def test_trace_json_and_jsonl(tmp_path):
  folder = tmp_path / "trace"
  folder.mkdir()
  (folder / "train.json").write_text(json.dumps([{"prompt": "Q: 1+1?\nA:", "answer": "2"}]))
  (folder / "test.jsonl").write_text('{"prompt": "Q: 2+2?\\nA:", "answer": "4"}\n\n{"prompt": "x", "answer": "y"}\n')
  data = D.load_task(D.TaskSpec.from_dict({"name": "math", "source": "trace", "path": str(folder)}))
  assert data.task.labels is None and data.task.template == D.IDENTITY_TEMPLATE
  assert D.build_prompt(data.task, data.train[0]) == "Q: 1+1?\nA:" and [e.answer for e in data.eval] == ["4", "y"]
  (folder / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n')
  with pytest.raises(D.DataError, match=r"test\.jsonl:2:\d+: malformed JSON line"):
    D.load_task(D.TaskSpec.from_dict({"name": "math", "source": "trace", "path": str(folder)}))
  (folder / "test.jsonl").write_text('{"prompt": "a", "answer": 4}\n')
  with pytest.raises(D.DataError, match=r"record 0 field 'answer' is a int"):
    D.load_task(D.TaskSpec.from_dict({"name": "math", "source": "trace", "path": str(folder)}))


def _prepare_tiny_ag_news(data_dir: Path) -> None:
  """Prepares a tiny dataset under TFDS's name ag_news_subset (same features) into data_dir, array_record."""
  tfds = pytest.importorskip("tensorflow_datasets")
  names = ["World", "Sports", "Business", "Sci/Tech"]

  with tfds.core.registered.skip_registration():
    class AgNewsSubset(tfds.core.GeneratorBasedBuilder):  # noqa: N801 - the class name gives the dataset name
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "title": tfds.features.Text(), "description": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=names)}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, {"title": f"T{i}", "description": f"D{i}", "label": i % 4}

  AgNewsSubset(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_by_name_with_table_label_names(tmp_path):
  _prepare_tiny_ag_news(tmp_path / "tfds")
  data = D.load_task(D.TaskSpec.from_dict({"name": "agnews", "source": "tfds", "tfds_name": "ag_news_subset",
                                           "path": str(tmp_path / "tfds"), "max_train": 5}))
  assert data.task.labels == ("World", "Sports", "Business", "Science or Technology")
  assert data.task.group == "TC" and data.task.instruction == D.OLORA_INSTRUCTIONS["TC"]
  assert len(data.train) == 5 and len(data.eval) == 4 and data.task.splits == {"train": "train", "eval": "test"}
  for ex in data.train + data.eval:
    i = int(ex.sentence.split("\n")[0][len("Title: T"):])
    assert ex.sentence == f"Title: T{i}\nText: D{i}\n" and ex.answer == data.task.labels[i % 4]
  with pytest.raises(D.DataError, match=r"no split|Unknown split 'validation'.*set train_split"):
    D.load_task(D.TaskSpec.from_dict({"name": "agnews", "source": "tfds", "tfds_name": "ag_news_subset",
                                      "path": str(tmp_path / "tfds"), "eval_split": "validation"}))


def test_tfds_not_prepared_is_a_clear_error_without_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(D.DataError, match=r"'ag_news_subset' is not prepared in data_dir .*array_record"):
    D.load_task(D.TaskSpec.from_dict({"name": "agnews", "source": "tfds", "tfds_name": "ag_news_subset",
                                      "path": str(tmp_path / "empty")}))
  assert not (tmp_path / "empty" / "downloads").exists()


def test_tfds_mapping_layer_on_a_fake_source():
  fake = [{"premise": b"p0", "hypothesis": b"h0", "label": 2}, {"premise": b"p1", "hypothesis": b"h1", "label": -1}]
  fmt = D.TFDS_FORMATS["glue/mnli"]
  names = ["entailment", "neutral", "contradiction"]
  out = D.read_tfds_split(fake, fields=fmt.fields, label_field="label", label_names=names, task="mnli",
                          origin="TFDS glue/mnli[x]", indices=np.array([0]))
  assert out[0].sentence == "sentence 1: p0\nsentence 2: h0\n" and out[0].answer == "contradiction"
  with pytest.raises(D.DataError, match=r"record 1 has label id -1.*unlabeled split.*'validation'"):
    D.read_tfds_split(fake, fields=fmt.fields, label_field="label", label_names=names, task="mnli",
                      origin="TFDS glue/mnli[test]", indices=np.array([1]))
  assert set(D.TFDS_FORMATS) >= {"ag_news_subset", "yelp_polarity_reviews", "imdb_reviews", "glue/sst2",
                                 "super_glue/boolq"}


def test_hf_saved_dataset_classlabel_and_freeform(tmp_path):
  datasets = pytest.importorskip("datasets")
  feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
  dd = datasets.DatasetDict({
    "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1]}, features=feats),
    "test": datasets.Dataset.from_dict({"text": ["d"], "label": [0]}, features=feats)})
  dd.save_to_disk(str(tmp_path / "cls"))
  data = D.load_task(D.TaskSpec.from_dict({"name": "toy", "source": "hf", "path": str(tmp_path / "cls"),
                                           "group": "SC", "labels": ["negative", "positive"]}))
  assert data.task.labels == ("negative", "positive") and data.task.instruction == D.OLORA_INSTRUCTIONS["SC"]
  assert [(e.sentence, e.answer) for e in data.train] == [("a", "negative"), ("b", "positive"), ("c", "positive")]
  free = datasets.DatasetDict({s: datasets.Dataset.from_dict({"question": ["q"], "context": ["c"], "answer": ["42"]})
                               for s in ("train", "test")})
  free.save_to_disk(str(tmp_path / "free"))
  data = D.load_task(D.TaskSpec.from_dict({"name": "qa", "source": "hf", "path": str(tmp_path / "free"),
                                           "text_fields": ["context", "question"]}))
  assert data.task.labels is None and data.train[0].sentence == "context: c\nquestion: q\n"
  assert data.train[0].answer == "42" and "Option" not in data.task.template
  with pytest.raises(D.DataError, match=r"no split 'dev' \(splits: \['test', 'train'\]\)"):
    D.load_task(D.TaskSpec.from_dict({"name": "qa", "source": "hf", "path": str(tmp_path / "free"),
                                      "text_fields": ["question"], "eval_split": "dev"}))
