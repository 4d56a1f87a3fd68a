"""Task descriptions: the validated config of one task (``TaskSpec``) and the resolved task (``Task``).

A ``TaskSpec`` is what a user writes in the runner's YAML (where to read the data from); a ``Task`` is what the
loader resolved from it (label set, instruction, template, split names). Both are frozen so that a task stream can be
hashed into a run's identity and compared on ``--resume``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SOURCES = ("cl_benchmark", "trace", "tfds", "hf", "synthetic")
TRUNCATION_SIDES = ("left", "right")


class DataError(ValueError):
  """Bad task data or task config. The message names the file or field, what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One example: the free text that goes into the prompt and the expected answer.

  Attributes:
    sentence: the example's own text (CL_Benchmark ``sentence``, TRACE ``prompt``, formatted TFDS/HF fields).
    answer: the target string (a label name for classification, free text otherwise).
    index: position of the record in its source split (before any subsampling), for error messages and
      per-example results.
  """

  sentence: str
  answer: str
  index: int


@dataclasses.dataclass(frozen=True)
class Task:
  """A resolved task of the stream.

  Attributes:
    name: dataset name as shown in the prompt (``Dataset:<name>``) and in results.
    group: task type as shown in the prompt (``Task:<group>``), e.g. ``SC`` or ``TC``.
    labels: the label words in their canonical order, or ``None`` for a free-form task.
    source: one of ``SOURCES``.
    instruction: the instruction text (ends with a newline in the O-LoRA configs).
    template: the prompt template (see ``clsvd_jax.data.prompts``).
    splits: role -> split name actually read, e.g. ``{"train": "train", "eval": "test"}``.
    truncation_side: which side of the sentence is dropped when a prompt is too long.
  """

  name: str
  group: str
  labels: tuple[str, ...] | None
  source: str
  instruction: str
  template: str
  splits: Mapping[str, str]
  truncation_side: str = "left"

  @property
  def options(self) -> str:
    """The label words joined as in the O-LoRA prompt (``", "``); empty for free-form tasks."""
    return ", ".join(self.labels) if self.labels else ""

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable form (for results.json and checkpoints)."""
    out = dataclasses.asdict(self)
    out["labels"] = list(self.labels) if self.labels is not None else None
    out["splits"] = dict(self.splits)
    return out


# key -> (accepted python types, description used in error messages)
_SPEC_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
  "name": ((str,), "string: the dataset name (e.g. dbpedia)"),
  "group": ((str,), "string: the task type shown as Task:<group> (e.g. TC)"),
  "source": ((str,), f"one of {', '.join(SOURCES)}"),
  "path": ((str,), "string: a benchmark root, task folder, JSON file, TFDS data_dir or saved HF dataset"),
  "tfds_name": ((str,), "string: a TFDS dataset name such as ag_news_subset or glue/sst2"),
  "hf_name": ((str,), "string: a Hugging Face dataset name for datasets.load_dataset"),
  "hf_config": ((str,), "string: the Hugging Face dataset configuration name"),
  "train_split": ((str,), "string: the split to train on"),
  "eval_split": ((str,), "string: the split to evaluate on"),
  "instruction": ((str,), "string: the instruction placed before the options"),
  "template": ((str,), "string with {group} {name} {instruction} {options} {sentence} fields"),
  "labels": ((list, tuple), "list of label strings"),
  "text_fields": ((list, tuple), "list of feature/column names that make up the sentence"),
  "label_field": ((str,), "string: the feature/column that holds the label or answer"),
  "max_train": ((int,), "positive integer: keep at most this many training examples"),
  "max_eval": ((int,), "positive integer: keep at most this many evaluation examples"),
  "sample_seed": ((int,), "integer: seed of the subsample taken by max_train / max_eval"),
  "seed": ((int,), "integer: seed of the generated synthetic stream"),
  "truncation_side": ((str,), f"one of {', '.join(TRUNCATION_SIDES)}: which end of an over-long sentence is cut"),
}

_REQUIRED_PATH = {"cl_benchmark": "path", "trace": "path", "tfds": "tfds_name"}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task as configured (validated by ``TaskSpec.from_dict``). See ``_SPEC_FIELDS`` for each key."""

  name: str
  source: str
  group: str | None = None
  path: str | None = None
  tfds_name: str | None = None
  hf_name: str | None = None
  hf_config: str | None = None
  train_split: str | None = None
  eval_split: str | None = None
  instruction: str | None = None
  template: str | None = None
  labels: tuple[str, ...] | None = None
  text_fields: tuple[str, ...] | None = None
  label_field: str | None = None
  max_train: int | None = None
  max_eval: int | None = None
  sample_seed: int = 0
  seed: int = 0
  truncation_side: str = "left"

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], where: str = "task") -> TaskSpec:
    """Validates one task entry of a config.

    Args:
      config: the mapping from the YAML.
      where: how to name this entry in messages, e.g. ``"tasks[2]"``.

    Raises:
      DataError: naming the key, what was expected and (for unknown keys / sources) the allowed values.
    """
    if not isinstance(config, Mapping):
      raise DataError(f"{where}: expected a mapping with keys {sorted(_SPEC_FIELDS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_SPEC_FIELDS))
    if unknown:
      raise DataError(f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(sorted(_SPEC_FIELDS))}")
    for key in ("name", "source"):
      if key not in config:
        raise DataError(f"{where}: missing required key '{key}' ({_SPEC_FIELDS[key][1]})")
    values: dict[str, Any] = {}
    for key, value in config.items():
      types, desc = _SPEC_FIELDS[key]
      if value is None:
        continue
      # bool is an int subclass; a YAML `max_train: yes` is a mistake, not 1.
      if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{where}.{key}: expected {desc}, got {type(value).__name__} {value!r}")
      if key in ("labels", "text_fields"):
        bad = [v for v in value if not isinstance(v, str)]
        if bad or not value:
          raise DataError(f"{where}.{key}: expected a non-empty {desc}, got {value!r}")
        if key == "labels" and len(set(value)) != len(value):
          raise DataError(f"{where}.labels: duplicate label words in {list(value)}")
        value = tuple(value)
      if key in ("max_train", "max_eval") and value <= 0:
        raise DataError(f"{where}.{key}: expected a {desc}, got {value}")
      if key in ("name", "group", "path", "tfds_name", "hf_name", "train_split", "eval_split") and not value.strip():
        raise DataError(f"{where}.{key}: must not be empty")
      values[key] = value
    where = f"{where} ({values['name']})"
    if values["source"] not in SOURCES:
      raise DataError(f"{where}.source: unknown source {values['source']!r}; allowed: {', '.join(SOURCES)}")
    if values.get("truncation_side", "left") not in TRUNCATION_SIDES:
      raise DataError(f"{where}.truncation_side: {values['truncation_side']!r}; allowed: {', '.join(TRUNCATION_SIDES)}")
    source = values["source"]
    need = _REQUIRED_PATH.get(source)
    if need and need not in values:
      raise DataError(f"{where}: source '{source}' needs the key '{need}' ({_SPEC_FIELDS[need][1]})")
    if source == "hf" and "hf_name" not in values and "path" not in values:
      raise DataError(f"{where}: source 'hf' needs 'hf_name' (datasets.load_dataset) or 'path' (a dataset saved "
                      "with save_to_disk)")
    if "template" in values and values["template"].count("{sentence}") != 1:
      raise DataError(f"{where}.template: must contain the field {{sentence}} exactly once, got "
                      f"{values['template']!r}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """The non-default fields, as they would be written in a config."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value != f.default:
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def parse_task_specs(configs: Any, where: str = "tasks") -> list[TaskSpec]:
  """Validates the ``tasks`` list of a config (all entries, unique names).

  Raises:
    DataError: for the first bad entry, or duplicate task names.
  """
  if not isinstance(configs, (list, tuple)) or not configs:
    raise DataError(f"{where}: expected a non-empty list of task mappings, got {configs!r}")
  specs = [TaskSpec.from_dict(c, f"{where}[{i}]") for i, c in enumerate(configs)]
  seen: dict[str, int] = {}
  for i, spec in enumerate(specs):
    if spec.name in seen:
      raise DataError(f"{where}[{i}]: task name {spec.name!r} already used by {where}[{seen[spec.name]}]; names must "
                      "be unique within a stream")
    seen[spec.name] = i
  return specs
