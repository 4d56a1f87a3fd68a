"""Readers that turn a ``TaskSpec`` into a ``Task`` and lists of ``Example``.

Sources (docs/design.md §8):
  * ``cl_benchmark``: O-LoRA's CL_Benchmark layout ``<root>/<group>/<task>/{train,dev,test,labels}.json`` with
    ``<root>/instruction_config.json``; records ``{"label", "sentence"}``.
  * ``trace``: TRACE-style ``<path>/<split>.json`` (or ``.jsonl``) lists of ``{"prompt", "answer"}``.
  * ``tfds``: a TFDS dataset by name through ``tfds.data_source`` (random access over array_record files, no
    TensorFlow needed), with label names from the builder info and the text/label features of ``TFDS_FORMATS``.
  * ``hf``: a Hugging Face dataset through ``datasets.load_dataset`` or ``datasets.load_from_disk``.
  * ``synthetic``: the project's own offline stream (``clsvd_jax.data.synthetic``), written in the CL_Benchmark
    layout and read back by the same reader.

Every problem is reported before a run starts (``load_tasks`` reads the whole stream and reports every bad task at
once) with a message that names the file or field, the record, and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clsvd_jax.data import prompts
from clsvd_jax.data.tasks import DataError, Example, Task, TaskSpec

INSTRUCTION_FILE = "instruction_config.json"
CL_LAYOUT = "<root>/<group>/<task>/{train,dev,test,labels}.json with <root>/instruction_config.json"


@dataclasses.dataclass
class TaskData:
  """A loaded task: the resolved ``Task``, its training and evaluation examples, and notes for the log."""

  task: Task
  train: list[Example]
  eval: list[Example]
  notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# JSON helpers


def read_json(path: str | os.PathLike[str], what: str) -> Any:
  """Parses a ``.json`` file (or a ``.jsonl`` file into a list), with the line of any syntax error.

  Args:
    path: the file.
    what: what the file should hold, for the message when it is missing.

  Raises:
    DataError: missing file (with ``what``), or malformed JSON naming ``file:line:column``.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file not found; expected {what}")
  text = path.read_text(encoding="utf-8-sig")
  if path.suffix == ".jsonl":
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}:{e.colno}: malformed JSON line ({e.msg}); each line must be one JSON "
                          "object") from None
    return rows
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file at line {e.lineno}") \
      from None


def _records(path: Path, what: str, fields: Sequence[str], name: str, split: str) -> list[dict[str, str]]:
  """A JSON list of objects with the given string fields; checks the type of every record."""
  data = read_json(path, what)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of records {{{', '.join(repr(f) for f in fields)}}}, got a "
                    f"{type(data).__name__}")
  if not data:
    raise DataError(f"{path}: the '{split}' split of task '{name}' is empty; it needs at least one record")
  for i, rec in enumerate(data):
    if not isinstance(rec, dict):
      raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object with string fields "
                      f"{list(fields)}")
    for f in fields:
      if f not in rec:
        raise DataError(f"{path}: record {i} lacks the field '{f}'; every record needs string fields {list(fields)} "
                        f"(keys found: {sorted(rec)})")
      if not isinstance(rec[f], str):
        raise DataError(f"{path}: record {i} field '{f}' is a {type(rec[f]).__name__} ({rec[f]!r}), expected a "
                        "string")
  return data


def _check_labels(examples: Sequence[Example], labels: tuple[str, ...] | None, origin: str, label_source: str) -> None:
  if labels is None:
    return
  allowed = set(labels)
  for ex in examples:
    if ex.answer not in allowed:
      raise DataError(f"{origin}: record {ex.index} has label {ex.answer!r}, which is not in {label_source} "
                      f"(allowed: {list(labels)}); fix the record or add the label there")


def subsample(examples: list[Example], max_n: int | None, seed: int) -> list[Example]:
  """At most ``max_n`` examples, drawn without replacement by ``seed`` and kept in file order.

  Files are often sorted by class, so the first ``max_n`` would not do.
  """
  if max_n is None or len(examples) <= max_n:
    return list(examples)
  keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_n, replace=False))
  return [examples[i] for i in keep]


def _sample_indices(n: int, max_n: int | None, seed: int) -> np.ndarray:
  if max_n is None or n <= max_n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


def _resolve(path: str, base_dir: str | os.PathLike[str] | None) -> Path:
  p = Path(os.path.expanduser(path))
  if not p.is_absolute() and base_dir is not None:
    p = Path(base_dir) / p
  return p


# ---------------------------------------------------------------------------------------------------------------
# CL_Benchmark (O-LoRA)


def read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
  """Reads a ``labels.json`` list of label strings."""
  path = Path(path)
  labels = read_json(path, "labels.json: a JSON list of the task's label strings")
  if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
    raise DataError(f"{path}: expected a non-empty JSON list of label strings, got {labels!r:.200}")
  if len(set(labels)) != len(labels):
    raise DataError(f"{path}: duplicate labels in {labels}")
  return tuple(labels)


def read_instruction(root: str | os.PathLike[str], group: str) -> str:
  """The zero-shot instruction of ``group`` in ``<root>/instruction_config.json`` (O-LoRA's format)."""
  path = Path(root) / INSTRUCTION_FILE
  what = (f"O-LoRA's {INSTRUCTION_FILE} ({{group: [{{\"instruction_type\": \"zero-shot\", \"instruction\": ...}}]}}) "
          "at the benchmark root; or set 'instruction' in the task config")
  config = read_json(path, what)
  if not isinstance(config, dict):
    raise DataError(f"{path}: expected an object mapping task groups to instruction lists")
  if group not in config:
    raise DataError(f"{path}: no instruction for group '{group}' (groups present: {sorted(config)}); add one or set "
                    "'instruction' in the task config")
  entries = config[group]
  if isinstance(entries, str):
    return entries
  if not isinstance(entries, list) or not entries:
    raise DataError(f"{path}: group '{group}' must map to a non-empty list of {{\"instruction\": ...}} objects")
  zero_shot = [e for e in entries if isinstance(e, dict) and e.get("instruction_type", "zero-shot") == "zero-shot"]
  entry = (zero_shot or entries)[0]
  if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
    raise DataError(f"{path}: group '{group}': the entry {entry!r:.120} has no string 'instruction'")
  return entry["instruction"]


def _cl_task_dir(spec: TaskSpec, base_dir: Any) -> tuple[Path, Path, str]:
  """(benchmark root, task folder, group) of a cl_benchmark spec whose path is the root or the task folder."""
  path = _resolve(spec.path, base_dir)
  if not path.is_dir():
    raise DataError(f"task '{spec.name}': path {path} is not a folder; expected the CL_Benchmark root ({CL_LAYOUT}) "
                    "or the task's own folder")
  if any((path / f).is_file() for f in ("train.json", "labels.json", "test.json")):
    return path.parent.parent, path, spec.group or path.parent.name
  if spec.group:
    return path, path / spec.group / spec.name, spec.group
  found = sorted(d for d in path.glob(f"*/{spec.name}") if d.is_dir())
  if not found:
    raise DataError(f"task '{spec.name}': no folder {path}/<group>/{spec.name}; expected {CL_LAYOUT} (groups "
                    f"present: {sorted(d.name for d in path.iterdir() if d.is_dir())})")
  if len(found) > 1:
    raise DataError(f"task '{spec.name}': found in several groups {[d.parent.name for d in found]} under {path}; "
                    "set 'group' in the task config")
  return path, found[0], found[0].parent.name


def read_cl_split(task_dir: Path, split: str, name: str, labels: tuple[str, ...] | None,
                  labels_origin: str) -> list[Example]:
  """Reads one CL_Benchmark split file and checks every label against the label set."""
  path = task_dir / f"{split}.json"
  recs = _records(path, f"the '{split}' split of task '{name}' in the CL_Benchmark layout ({CL_LAYOUT})",
                  ("label", "sentence"), name, split)
  examples = [Example(sentence=r["sentence"], answer=r["label"], index=i) for i, r in enumerate(recs)]
  _check_labels(examples, labels, str(path), labels_origin)
  return examples


def _load_cl_benchmark(spec: TaskSpec, base_dir: Any, source: str = "cl_benchmark") -> TaskData:
  root, task_dir, group = _cl_task_dir(spec, base_dir)
  if not task_dir.is_dir():
    raise DataError(f"task '{spec.name}': folder {task_dir} not found; expected {CL_LAYOUT}")
  notes = []
  if spec.labels is not None:
    labels, labels_origin = spec.labels, f"the task config's 'labels' of '{spec.name}'"
  else:
    labels = read_labels(task_dir / "labels.json")
    labels_origin = str(task_dir / "labels.json")
  instruction = spec.instruction if spec.instruction is not None else read_instruction(root, group)
  train_split = spec.train_split or "train"
  eval_split = spec.eval_split or "dev"
  if spec.eval_split is None and not (task_dir / "dev.json").is_file():
    # The published benchmark's dev.json is a copy of test.json; samples often leave it out.
    eval_split = "test"
    notes.append(f"task '{spec.name}': {task_dir / 'dev.json'} absent, evaluating on test.json")
  train = read_cl_split(task_dir, train_split, spec.name, labels, labels_origin)
  evals = read_cl_split(task_dir, eval_split, spec.name, labels, labels_origin)
  task = Task(name=spec.name, group=group, labels=labels, source=source, instruction=instruction,
              template=spec.template or prompts.default_template(labels, source),
              splits={"train": train_split, "eval": eval_split}, truncation_side=spec.truncation_side)
  return TaskData(task, train, evals, notes)


# ---------------------------------------------------------------------------------------------------------------
# TRACE


def _trace_file(folder: Path, split: str) -> Path:
  for suffix in (".json", ".jsonl"):
    if (folder / f"{split}{suffix}").is_file():
      return folder / f"{split}{suffix}"
  return folder / f"{split}.json"


def read_trace_split(path: str | os.PathLike[str], name: str, split: str) -> list[Example]:
  """Reads a TRACE-style list of ``{"prompt", "answer"}`` records (``.json`` list or ``.jsonl``)."""
  path = Path(path)
  recs = _records(path, f"the '{split}' split of TRACE-style task '{name}': a JSON list of {{\"prompt\", \"answer\"}}",
                  ("prompt", "answer"), name, split)
  return [Example(sentence=r["prompt"], answer=r["answer"], index=i) for i, r in enumerate(recs)]


def _load_trace(spec: TaskSpec, base_dir: Any) -> TaskData:
  folder = _resolve(spec.path, base_dir)
  if not folder.is_dir():
    raise DataError(f"task '{spec.name}': path {folder} is not a folder; expected the TRACE task folder holding "
                    "<split>.json files (train.json, test.json)")
  train_split, eval_split = spec.train_split or "train", spec.eval_split or "test"
  train = read_trace_split(_trace_file(folder, train_split), spec.name, train_split)
  evals = read_trace_split(_trace_file(folder, eval_split), spec.name, eval_split)
  origin = "the task config's 'labels'"
  _check_labels(train, spec.labels, str(_trace_file(folder, train_split)), origin)
  _check_labels(evals, spec.labels, str(_trace_file(folder, eval_split)), origin)
  instruction = spec.instruction if spec.instruction is not None else ""
  task = Task(name=spec.name, group=spec.group or "TRACE", labels=spec.labels, source="trace",
              instruction=instruction, template=spec.template or prompts.default_template(spec.labels, "trace"),
              splits={"train": train_split, "eval": eval_split}, truncation_side=spec.truncation_side)
  return TaskData(task, train, evals, [])


# ---------------------------------------------------------------------------------------------------------------
# TFDS


@dataclasses.dataclass(frozen=True)
class TfdsFormat:
  """How one TFDS dataset becomes examples.

  Attributes:
    group: default task group (selects O-LoRA's instruction for it).
    fields: ``(shown name, feature)`` pairs; the sentence is ``"<shown>: <value>\\n"`` per field (this is the
      CL_Benchmark's own ``"Title: ...\\nText: ...\\n"`` form for AG News / Yelp).
    label_field: the ClassLabel feature.
    label_map: builder label name -> label word used in prompts (to match the CL_Benchmark words).
    eval_split: default evaluation split (GLUE/SuperGLUE test splits carry no labels).
  """

  group: str
  fields: tuple[tuple[str, str], ...]
  label_field: str = "label"
  label_map: tuple[tuple[str, str], ...] = ()
  eval_split: str = "test"


_NLI = (("sentence 1", "premise"), ("sentence 2", "hypothesis"))
_PAIR = (("sentence 1", "sentence1"), ("sentence 2", "sentence2"))
_POLARITY = (("neg", "negative"), ("pos", "positive"))
TFDS_FORMATS: dict[str, TfdsFormat] = {
  "ag_news_subset": TfdsFormat("TC", (("Title", "title"), ("Text", "description")),
                               label_map=(("Sci/Tech", "Science or Technology"),)),
  "yelp_polarity_reviews": TfdsFormat("SC", (("Text", "text"),), label_map=(("1", "negative"), ("2", "positive"))),
  "imdb_reviews": TfdsFormat("SC", (("Text", "text"),), label_map=_POLARITY),
  "glue/cola": TfdsFormat("CoLA", (("Text", "sentence"),), eval_split="validation"),
  "glue/sst2": TfdsFormat("SC", (("Text", "sentence"),), eval_split="validation"),
  "glue/mrpc": TfdsFormat("QQP", (("first sentence", "sentence1"), ("second sentence", "sentence2")),
                          eval_split="validation"),
  "glue/qqp": TfdsFormat("QQP", (("first sentence", "question1"), ("second sentence", "question2")),
                         eval_split="validation"),
  "glue/mnli": TfdsFormat("NLI", _NLI, eval_split="validation_matched"),
  "glue/qnli": TfdsFormat("NLI", (("sentence 1", "question"), ("sentence 2", "sentence")), eval_split="validation"),
  "glue/rte": TfdsFormat("NLI", _PAIR, eval_split="validation"),
  "glue/wnli": TfdsFormat("NLI", _PAIR, eval_split="validation"),
  "super_glue/boolq": TfdsFormat("BoolQA", (("passage", "passage"), ("question", "question")), eval_split="validation"),
  "super_glue/cb": TfdsFormat("NLI", _NLI, eval_split="validation"),
  "super_glue/rte": TfdsFormat("NLI", _NLI, eval_split="validation"),
  "super_glue/copa": TfdsFormat("COPA", (("premise", "premise"), ("question", "question"), ("choice 1", "choice1"),
                                         ("choice 2", "choice2")), eval_split="validation"),
  "super_glue/multirc": TfdsFormat("MultiRC", (("paragraph", "paragraph"), ("question", "question"),
                                               ("answer", "answer")), eval_split="validation"),
  "super_glue/wic": TfdsFormat("WiC", (("word", "word"), ("sentence 1", "sentence1"), ("sentence 2", "sentence2")),
                               eval_split="validation"),
}


def tfds_format(tfds_name: str) -> TfdsFormat | None:
  """The table entry of a TFDS name (version suffix ``:x.y.z`` ignored), or ``None``."""
  return TFDS_FORMATS.get(tfds_name.split(":")[0])


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def format_fields(record: dict[str, Any], fields: Sequence[tuple[str, str]]) -> str:
  """``"<shown>: <value>\\n"`` per field; a single unnamed field (shown name ``""``) is the raw value."""
  if len(fields) == 1 and not fields[0][0]:
    return _as_text(record[fields[0][1]])
  return "".join(f"{shown}: {_as_text(record[key])}\n" for shown, key in fields)


def _tfds_source(tfds_name: str, split: str, data_dir: Path | None, task: str):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - tfds is a core dependency
    raise DataError(f"task '{task}': source 'tfds' needs tensorflow-datasets (pip install tensorflow-datasets): {e}") \
      from None
  where = f"data_dir {data_dir}" if data_dir else "the default TFDS data_dir"
  try:
    builder = tfds.builder(tfds_name, data_dir=str(data_dir) if data_dir else None)
  except Exception as e:  # DatasetNotFoundError and friends: the message lists what exists
    raise DataError(f"task '{task}': TFDS dataset {tfds_name!r} not found in {where}: {str(e)[:300]}") from None
  if not builder.is_prepared():
    raise DataError(f"task '{task}': TFDS dataset {tfds_name!r} is not prepared in {where}; prepare it once where "
                    "there is network, in array_record format: tfds.builder(name, data_dir=..., "
                    "file_format='array_record').download_and_prepare(), then point 'path' at that data_dir")
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=str(data_dir) if data_dir else None, download=False)
  except NotImplementedError:
    raise DataError(f"task '{task}': TFDS dataset {tfds_name!r} in {where} is stored as TFRecord, which has no random "
                    "access without TensorFlow; prepare it again with file_format='array_record'") from None
  except ValueError as e:  # unknown split: the message lists the splits present
    raise DataError(f"task '{task}': TFDS dataset {tfds_name!r}: {e}; set train_split / eval_split") from None


def read_tfds_split(source: Any, *, fields: Sequence[tuple[str, str]], label_field: str, label_names: Sequence[str],
                    task: str, origin: str, indices: np.ndarray) -> list[Example]:
  """Reads the records ``indices`` of a random-access source and maps class ids to label words.

  ``source`` is anything with ``__getitem__`` over dict records (``tfds.data_source``'s result, or a fake in tests).
  """
  examples = []
  for i in indices:
    rec = source[int(i)]
    missing = [k for _, k in fields if k not in rec] + ([label_field] if label_field not in rec else [])
    if missing:
      raise DataError(f"{origin}: record {i} lacks feature(s) {missing} (features: {sorted(rec)}); set text_fields "
                      "/ label_field in the task config")
    label = int(rec[label_field])
    if not 0 <= label < len(label_names):
      hint = " (-1 marks an unlabeled split such as a GLUE test split; evaluate on 'validation')" if label < 0 else ""
      raise DataError(f"{origin}: record {i} has label id {label}, outside the {len(label_names)} classes "
                      f"{list(label_names)}{hint}")
    examples.append(Example(sentence=format_fields(rec, fields), answer=label_names[label], index=int(i)))
  return examples


def _load_tfds(spec: TaskSpec, base_dir: Any) -> TaskData:
  fmt = tfds_format(spec.tfds_name)
  data_dir = _resolve(spec.path, base_dir) if spec.path else None
  train_split = spec.train_split or "train"
  eval_split = spec.eval_split or (fmt.eval_split if fmt else "test")
  label_field = spec.label_field or (fmt.label_field if fmt else "label")
  out: dict[str, list[Example]] = {}
  labels: tuple[str, ...] | None = None
  fields: tuple[tuple[str, str], ...] = ()
  for role, split, max_n in (("train", train_split, spec.max_train), ("eval", eval_split, spec.max_eval)):
    source = _tfds_source(spec.tfds_name, split, data_dir, spec.name)
    origin = f"TFDS {spec.tfds_name}[{split}]"
    features = source.dataset_info.features
    if label_field not in features or not hasattr(features[label_field], "names"):
      raise DataError(f"task '{spec.name}': {origin} has no ClassLabel feature '{label_field}' (features: "
                      f"{sorted(features)}); set label_field")
    if spec.text_fields:
      fields = tuple((f, f) for f in spec.text_fields) if len(spec.text_fields) > 1 else (("", spec.text_fields[0]),)
    elif fmt:
      fields = fmt.fields
    else:
      text = sorted(k for k in features if k != label_field and type(features[k]).__name__ == "Text")
      if not text:
        raise DataError(f"task '{spec.name}': {origin} has no text feature; set text_fields (features: "
                        f"{sorted(features)})")
      fields = tuple((f, f) for f in text) if len(text) > 1 else (("", text[0]),)
    names = list(features[label_field].names)
    if spec.labels is not None:
      if len(spec.labels) != len(names):
        raise DataError(f"task '{spec.name}'.labels: {len(spec.labels)} words given but {origin} has {len(names)} "
                        f"classes {names}; give one word per class id")
      names = list(spec.labels)
    elif fmt:
      mapping = dict(fmt.label_map)
      names = [mapping.get(n, n) for n in names]
    labels = tuple(names)
    if len(source) == 0:
      raise DataError(f"task '{spec.name}': {origin} is empty")
    idx = _sample_indices(len(source), max_n, spec.sample_seed)
    out[role] = read_tfds_split(source, fields=fields, label_field=label_field, label_names=names, task=spec.name,
                                origin=origin, indices=idx)
  group = spec.group or (fmt.group if fmt else spec.tfds_name.split("/")[0].split(":")[0])
  instruction = spec.instruction if spec.instruction is not None else prompts.OLORA_INSTRUCTIONS.get(
    group, prompts.GENERIC_INSTRUCTION)
  task = Task(name=spec.name, group=group, labels=labels, source="tfds", instruction=instruction,
              template=spec.template or prompts.default_template(labels, "tfds"),
              splits={"train": train_split, "eval": eval_split}, truncation_side=spec.truncation_side)
  return TaskData(task, out["train"], out["eval"], [])


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_split(spec: TaskSpec, split: str, base_dir: Any):
  try:
    import datasets
  except ImportError:
    raise DataError(f"task '{spec.name}': source 'hf' needs the datasets package (pip install 'clsvd_jax[hf]')") \
      from None
  if spec.path:
    path = _resolve(spec.path, base_dir)
    if not path.exists():
      raise DataError(f"task '{spec.name}': path {path} not found; expected a dataset saved with save_to_disk")
    try:
      ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
      raise DataError(f"task '{spec.name}': {path} is not a dataset saved with save_to_disk ({e})") from None
    origin = str(path)
  else:
    try:
      ds = datasets.load_dataset(spec.hf_name, spec.hf_config)
    except Exception as e:
      raise DataError(f"task '{spec.name}': datasets.load_dataset({spec.hf_name!r}, {spec.hf_config!r}) failed: "
                      f"{str(e)[:300]}") from None
    origin = f"HF {spec.hf_name}" + (f"/{spec.hf_config}" if spec.hf_config else "")
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise DataError(f"task '{spec.name}': {origin} has no split '{split}' (splits: {sorted(ds)}); set train_split / "
                      "eval_split")
    return ds[split], f"{origin}[{split}]"
  raise DataError(f"task '{spec.name}': {origin} holds a single Dataset, not a DatasetDict of splits; save a "
                  "DatasetDict({'train': ..., 'test': ...})")


def _load_hf(spec: TaskSpec, base_dir: Any) -> TaskData:
  import datasets

  train_split, eval_split = spec.train_split or "train", spec.eval_split or "test"
  out: dict[str, list[Example]] = {}
  labels = spec.labels
  for role, split, max_n in (("train", train_split, spec.max_train), ("eval", eval_split, spec.max_eval)):
    ds, origin = _hf_split(spec, split, base_dir)
    columns = list(ds.column_names)
    text_fields = spec.text_fields or next(([c] for c in ("sentence", "text") if c in columns), None)
    if text_fields is None:
      raise DataError(f"task '{spec.name}': {origin}: no 'sentence' or 'text' column; set text_fields to some of "
                      f"{columns}")
    label_field = spec.label_field or next((c for c in ("label", "answer") if c in columns), None)
    missing = [c for c in [*text_fields, label_field] if c not in columns]
    if label_field is None or missing:
      raise DataError(f"task '{spec.name}': {origin}: column(s) {missing or ['label']} not found (columns: {columns});"
                      " set text_fields / label_field")
    feature = ds.features[label_field]
    if len(ds) == 0:
      raise DataError(f"task '{spec.name}': {origin} is empty")
    idx = _sample_indices(len(ds), max_n, spec.sample_seed)
    rows = ds.select(idx.tolist())
    fields = tuple((f, f) for f in text_fields) if len(text_fields) > 1 else (("", text_fields[0]),)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if class_names is not None and spec.labels is not None and len(spec.labels) != len(class_names):
      raise DataError(f"task '{spec.name}'.labels: {len(spec.labels)} words for the {len(class_names)} classes "
                      f"{class_names} of {origin}")
    examples = []
    for i, rec in zip(idx, rows):
      value = rec[label_field]
      if class_names is not None:
        names = list(spec.labels) if spec.labels is not None else class_names
        if not 0 <= int(value) < len(names):
          raise DataError(f"{origin}: record {i} has label id {value}, outside the classes {names}")
        answer = names[int(value)]
      elif isinstance(value, str):
        answer = value
      else:
        raise DataError(f"{origin}: record {i} column '{label_field}' is {type(value).__name__} {value!r}; expected a "
                        "ClassLabel or a string column")
      examples.append(Example(sentence=format_fields(rec, fields), answer=answer, index=int(i)))
    if class_names is not None:
      labels = tuple(spec.labels) if spec.labels is not None else tuple(class_names)
    _check_labels(examples, labels, origin, "the task's label set")
    out[role] = examples
  group = spec.group or "HF"
  instruction = spec.instruction if spec.instruction is not None else prompts.OLORA_INSTRUCTIONS.get(
    group, prompts.GENERIC_INSTRUCTION if labels else "")
  task = Task(name=spec.name, group=group, labels=labels, source="hf", instruction=instruction,
              template=spec.template or prompts.default_template(labels, "hf"),
              splits={"train": train_split, "eval": eval_split}, truncation_side=spec.truncation_side)
  return TaskData(task, out["train"], out["eval"], [])


# ---------------------------------------------------------------------------------------------------------------
# Synthetic stream and dispatch


def _load_synthetic(spec: TaskSpec, base_dir: Any) -> TaskData:
  from clsvd_jax.data import synthetic

  synthetic.check_synthetic_name(spec.name)
  if spec.path:
    root = _resolve(spec.path, base_dir)
  else:
    root = Path(tempfile.gettempdir()) / "clsvd_jax_synthetic" / f"seed{spec.seed}"
  synthetic.ensure_synthetic_benchmark(root, seed=spec.seed)
  data = _load_cl_benchmark(dataclasses.replace(spec, path=str(root), group=spec.group or synthetic.GROUP), None,
                            source="synthetic")
  data.notes.append(f"task '{spec.name}': synthetic stream (seed {spec.seed}) in {root}")
  return data


_LOADERS = {"cl_benchmark": _load_cl_benchmark, "trace": _load_trace, "tfds": _load_tfds, "hf": _load_hf,
            "synthetic": _load_synthetic}


def load_task(spec: TaskSpec, base_dir: str | os.PathLike[str] | None = None) -> TaskData:
  """Reads one task: resolves its ``Task`` and its training and evaluation examples.

  Args:
    spec: the validated task config.
    base_dir: folder that relative paths are relative to (the config file's folder).

  Raises:
    DataError: with the file / field, the record and the fix.
  """
  data = _LOADERS[spec.source](spec, base_dir)
  prompts.check_template(data.task.template, f"task '{spec.name}' template")
  if spec.source not in ("tfds", "hf"):  # those subsample before reading
    data.train = subsample(data.train, spec.max_train, spec.sample_seed)
    data.eval = subsample(data.eval, spec.max_eval, spec.sample_seed)
  return data


def load_tasks(specs: Sequence[TaskSpec], base_dir: str | os.PathLike[str] | None = None) -> list[TaskData]:
  """Reads a whole stream up front, so a run refuses to start instead of failing at task 7.

  Raises:
    DataError: listing every task that failed, one message each.
  """
  out, errors = [], []
  for spec in specs:
    try:
      out.append(load_task(spec, base_dir))
    except DataError as e:
      errors.append(str(e))
  if errors:
    if len(errors) == 1:
      raise DataError(errors[0])
    raise DataError(f"{len(errors)} tasks cannot be read:\n" + "\n".join(f"  - {e}" for e in errors))
  return out
