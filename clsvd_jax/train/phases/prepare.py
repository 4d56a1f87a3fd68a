"""Phase 1, prepare: the model, the tokenizer and every task of the stream, read and encoded up front.

Bad input fails here, before a single step, with a message that names the file or key and the fix: a missing
model folder, unreadable data, empty splits, or a ``training.max_length`` / ``max_target_length`` that cuts more
than ``training.max_truncated_share`` of a split's prompts or targets (any cut is reported as a note).

The label options of every task with a label set are tokenised here too, for rank classification
(``rank_classification.encode_options``); a task whose evaluation answers are not all among its labels is left to
exact match alone, with a note.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from clsvd_jax.config import ConfigError, RunConfig
from clsvd_jax.data import EncodedSplit, encode_task, load_tasks, parse_task_specs, tokenizer_info
from clsvd_jax.data.tasks import DataError
from clsvd_jax.train import model_io
from clsvd_jax.train import rank_classification as rank_lib


@dataclasses.dataclass
class Prepared:
  """Everything a run needs before its first step (built once; also used by ``clsvd eval``)."""

  config: RunConfig
  model: Any
  tokenizer: Any
  info: Any
  kind: str
  names: list[str]
  train_splits: list[EncodedSplit]
  eval_splits: list[EncodedSplit]
  notes: list[str]
  labels: list[tuple[str, ...] | None] = dataclasses.field(default_factory=list)
  options: list[rank_lib.OptionSet | None] = dataclasses.field(default_factory=list)


def prepare(config: RunConfig) -> Prepared:
  """Builds the model and tokenizer and reads and encodes the whole stream (bad data fails here, not at task 7).

  Raises:
    ConfigError / DataError: naming the file or key and the fix.
  """
  base = config.data_dir
  check_model_path(config, base)
  specs = parse_task_specs(config.tasks)
  datas = load_tasks(specs, base_dir=base)
  # The tasks first: a 'bpe' tokenizer learns its vocabulary from their training text.
  tokenizer = model_io.load_tokenizer(config.model, base_dir=base, tasks=datas)
  model = model_io.build_model(config.model, base_dir=base)
  model_io.check_vocab(model, tokenizer)
  kind = model_io.kind_of(model)
  info = tokenizer_info(tokenizer, kind)
  train_splits, eval_splits, notes = [], [], []
  for data in datas:
    if not data.train:
      raise DataError(f"task '{data.task.name}': the training split '{data.task.splits['train']}' is empty")
    if not data.eval:
      raise DataError(f"task '{data.task.name}': the evaluation split '{data.task.splits['eval']}' is empty")
    tr, ev = encode_task(data, tokenizer, kind=kind, max_length=config.training.max_length,
                         max_target_length=config.training.max_target_length)
    train_splits.append(tr)
    eval_splits.append(ev)
    notes.extend(data.notes)
    for split in (tr, ev):
      check_truncation(split, config.training.max_truncated_share)
      if split.truncated_prompts or split.truncated_targets:
        notes.append(split.report())
  labels = [d.task.labels for d in datas]
  options = [label_options(tokenizer, info, split, task_labels, notes) if config.eval.rank_classification else None
             for split, task_labels in zip(eval_splits, labels)]
  return Prepared(config, model, tokenizer, info, kind, [d.task.name for d in datas], train_splits, eval_splits,
                  notes, labels=labels, options=options)


def label_options(tokenizer: Any, info: Any, split: EncodedSplit, labels: tuple[str, ...] | None,
                  notes: list[str]) -> rank_lib.OptionSet | None:
  """The task's label options as token ids, or None (a free-form task, or answers outside its labels: noted)."""
  if not labels:
    return None
  outside = sorted({e.target for e in split.examples} - set(labels))
  if outside:
    notes.append(f"{split.name}: answers {outside[:3]} are not among the task's labels; rank classification skips "
                 "this task (exact match still scores it)")
    return None
  try:
    return rank_lib.encode_options(tokenizer, labels, info)
  except ValueError as e:
    notes.append(f"{split.name}: {e}; rank classification skips this task")
    return None


def check_model_path(config: RunConfig, base_dir: str | None) -> None:
  """Refuses a ``model.path`` that is not there (before the tokenizer, which defaults to it, is looked for).

  Raises:
    ConfigError: naming ``model.path`` and where it was looked for.
  """
  path = config.model.path
  if path is None:
    return
  p = Path(path).expanduser()
  places = [p] if p.is_absolute() or base_dir is None else [p, Path(base_dir) / p]
  if not any(c.exists() for c in places):
    raise ConfigError(f"model.path={path}: no such folder (looked at {' and '.join(str(c) for c in places)}); give "
                      "a Hugging Face checkpoint folder (config.json + safetensors), absolute or relative to "
                      "data_dir")


def check_truncation(split: EncodedSplit, max_share: float) -> None:
  """Refuses a split whose prompts or targets were cut in more than ``max_share`` of its examples.

  Raises:
    DataError: naming the split, the share and the config keys that fix it.
  """
  n = len(split)
  for count, key, limit, what in ((split.truncated_prompts, "max_length", split.max_length, "prompts"),
                                  (split.truncated_targets, "max_target_length", split.max_target_length,
                                   "targets")):
    if n and count / n > max_share:
      raise DataError(f"{split.name}: {count} of {n} {what} ({100 * count / n:.0f}%) are longer than "
                      f"training.{key}={limit} and would be cut, more than training.max_truncated_share="
                      f"{max_share:g} allows; raise training.{key}, or set training.max_truncated_share: 1.0 to "
                      "train on the cut examples anyway")
